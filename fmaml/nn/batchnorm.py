"""BatchNorm from batch statistics, written with mean/var ops so vmap's gradients are exact."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class BatchNorm(nn.Module):
    r"""Normalise with the current batch's statistics; no running statistics.

    .. math:: y = \frac{x - \mathrm{mean}(x)}{\sqrt{\mathrm{var}(x) + \epsilon}}\,\gamma + \beta

    over every axis except the channel axis 1. This is how MAML uses BatchNorm (also at test
    time, transductively). It is written with plain ``mean``/``var`` ops rather than
    ``F.batch_norm``, whose batching rule gives wrong second-order gradients under ``vmap``.

    Args:
        num_features: channels ``C`` of an input ``[n, C, *spatial]``.
        eps: added to the variance.
        affine: learn a scale ``weight`` and an offset ``bias`` (names as ``nn.BatchNorm2d``).
        stat_rows: if set, the statistics come from the first ``stat_rows`` rows of the batch
            only and normalise every row (fmaml puts a task's support set there so that
            its query set is normalised without using the query: see
            :class:`fmaml.SupervisedLoss`).
    """

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
        dims = [0, *range(2, x.dim())]
        source = x if self.stat_rows is None else x[: self.stat_rows]
        mean = source.mean(dim=dims, keepdim=True)
        var = ((source - mean) ** 2).mean(dim=dims, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is None:
            return out
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return out * self.weight.reshape(shape) + self.bias.reshape(shape)

    def extra_repr(self) -> str:
        rows = "" if self.stat_rows is None else f", stat_rows={self.stat_rows}"
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}{rows}"


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
