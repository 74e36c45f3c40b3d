"""BatchNorm from batch statistics, written with mean/var ops so vmap's gradients are exact.

Outside ``vmap`` the layer calls torch's fused kernel, whose second-order gradients are exact
there (``tests/test_strategy.py`` checks it against the autograd oracle); under ``vmap``,
whose batching rule for that kernel's double backward is wrong, it uses ``var_mean`` and one
fused ``addcmul``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchNorm(nn.Module):
    r"""Normalise with the current batch's statistics; no running statistics.

    .. math:: y = \frac{x - \mathrm{mean}(x)}{\sqrt{\mathrm{var}(x) + \epsilon}}\,\gamma + \beta

    over every axis except the channel axis 1. This is how MAML uses BatchNorm (also at test
    time, transductively). Under ``vmap`` it is computed with ``var_mean`` and ``addcmul``
    rather than ``F.batch_norm``, whose batching rule gives wrong second-order gradients
    there; outside ``vmap`` it calls ``F.batch_norm``'s fused kernel, exact there and faster.

    Args:
        num_features: channels ``C`` of an input ``[n, C, *spatial]``.
        eps: added to the variance.
        affine: learn a scale ``weight`` and an offset ``bias`` (names as ``nn.BatchNorm2d``).
        stat_rows: if set, the statistics come from the first ``stat_rows`` rows of the batch
            only and normalise every row (fmaml puts a task's support set there so that
            its query set is normalised without using the query: see
            :class:`fmaml.SupervisedLoss`).

    A bfloat16 or float16 input (mixed precision, :meth:`fmaml.SupervisedLoss.with_autocast`)
    is normalised in float32, statistics included, as autocast runs normalisation layers: the
    result is float32 under ``torch.autocast``, else the input's dtype.

    A copy made by :func:`with_stat_mask` holds ``stat_mask: [n]`` (bool, one per row of
    its input): the statistics are then the weighted ones over the rows marked ``True``
    only, so rows of padding change neither the mean nor the variance (exact under
    ``vmap`` and in every order of derivative; the fused kernel is not used).
    """

    stat_mask: Tensor | None = None
    """Rows whose statistics count (padded tasks); set on a per-call copy, never here."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        stat_rows: int | None = None,
    ):
        super().__init__()
        self.num_features, self.eps, self.stat_rows = num_features, eps, stat_rows
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype not in _LOW_PRECISION:
            return self._normalise(x, self.weight, self.bias)
        # bf16/fp16 input (autocast, or a low-precision model): statistics and normalisation
        # in float32, as torch's autocast runs its normalisation layers; the result in
        # float32 under autocast (its policy for float32 ops), else in the input's dtype.
        device = x.device.type
        with torch.autocast(device_type=device, enabled=False):
            weight, bias = (None if t is None else t.float() for t in (self.weight, self.bias))
            out = self._normalise(x.float(), weight, bias)
        return out if _autocast_enabled(device) else out.to(x.dtype)

    def _normalise(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        masked = self.stat_mask is not None
        if self.stat_rows is None and not masked and _fused_kernel_is_exact(x):
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        if masked:
            var, mean = _masked_var_mean(x, self.stat_mask, dims)
        else:
            source = x if self.stat_rows is None else x[: self.stat_rows]
            var, mean = torch.var_mean(source, dim=dims, correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        if weight is None:
            return (x - mean) * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        # One fused pass for the affine part: (x - mean) * (rstd * weight) + bias.
        scale = scale * weight.reshape(shape)
        return torch.addcmul(bias.reshape(shape), x - mean, scale)

    def extra_repr(self) -> str:
        rows = "" if self.stat_rows is None else f", stat_rows={self.stat_rows}"
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}{rows}"


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def has_batchnorm(module: object) -> bool:
    """Whether ``module`` (an ``nn.Module``; anything else has none) holds a BatchNorm layer,
    fmaml's or torch's."""
    return isinstance(module, nn.Module) and any(
        isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm)) for m in module.modules()
    )


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` in this thread."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.BatchNorm1d/2d/3d`` replaced by :class:`BatchNorm`.

    Parameter names are unchanged (``...weight``, ``...bias``); running statistics are
    dropped, because MAML normalises with batch statistics and running statistics are
    in-place state that ``vmap`` and second-order gradients cannot carry. The input model is
    not modified.

    Example:
        >>> from torch import nn
        >>> m = with_batch_statistics(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
        >>> type(m[1]).__name__
        'BatchNorm'
    """
    model = copy.deepcopy(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                replacement = BatchNorm(child.num_features, child.eps, affine=child.affine)
                if child.affine:
                    replacement.weight = child.weight
                    replacement.bias = child.bias
                setattr(parent, name, replacement)
    return model


def with_stat_rows(model: nn.Module, rows: int) -> nn.Module:
    """A shallow copy of ``model`` whose :class:`BatchNorm` layers take statistics from the
    first ``rows`` rows; parameters and other modules are shared, not copied."""
    copied = copy.copy(model)
    copied._modules = {name: with_stat_rows(child, rows) for name, child in model._modules.items()}
    if isinstance(copied, BatchNorm):
        copied.stat_rows = rows
    return copied


def with_stat_mask(model: nn.Module, mask: Tensor) -> nn.Module:
    """A shallow copy of ``model`` whose :class:`BatchNorm` layers take statistics from the
    rows ``mask: [n]`` (bool) marks only; parameters and other modules are shared, not
    copied, and ``model`` is not changed (so threads sharing it are safe). The copy lives
    for one call: under ``vmap`` it holds that call's per-task mask."""
    copied = copy.copy(model)
    copied._modules = {name: with_stat_mask(child, mask) for name, child in model._modules.items()}
    if isinstance(copied, BatchNorm):
        copied.stat_mask = mask
    return copied


def _masked_var_mean(x: Tensor, mask: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
    """``torch.var_mean(x[mask], dims, correction=0)`` without indexing (safe under ``vmap``):
    weighted sums with weight 1 on the rows ``mask`` marks and 0 elsewhere. A masked row's
    values enter multiplied by 0 only (finite padding changes nothing, its gradient is 0)."""
    weight = mask.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    count = weight.sum() * (x[0, 0].numel())  # real rows times spatial positions
    mean = (x * weight).sum(dim=dims, keepdim=True) / count
    var = ((x - mean).square() * weight).sum(dim=dims, keepdim=True) / count
    return var, mean


def _fused_kernel_is_exact(x: Tensor) -> bool:
    """Whether torch's fused batch-norm kernel gives exact first and second-order gradients
    for ``x`` (third and higher orders it refuses with an error, never a wrong value).

    It does unless a ``vmap`` transform is active (its batching rule for the double backward
    is inexact), and it refuses a single value per channel, which the ops path normalises.
    """
    if x.dim() < 2 or x.numel() <= x.shape[1]:
        return False
    try:
        stack = torch._C._functorch.get_interpreter_stack()
        vmap = torch._C._functorch.TransformType.Vmap
    except AttributeError:  # an older or newer torch without this API: take the exact path
        return False
    return not stack or all(level.key() != vmap for level in stack)
