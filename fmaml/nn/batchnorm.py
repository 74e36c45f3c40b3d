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
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is None:
            return out
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return out * self.weight.reshape(shape) + self.bias.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


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
