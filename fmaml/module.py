"""Bridges from ``nn.Module`` to pure functions of a parameter dict."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from fmaml.nn.batchnorm import with_batch_statistics
from fmaml.types import Batch, Params


def params_of(model: nn.Module) -> Params:
    """The model's trainable parameters as a dict of fresh leaves.

    Each tensor is a detached copy that requires grad, so an optimizer stepping on them never
    touches the module, and the module never changes them.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``{name: tensor}`` for every parameter with ``requires_grad``, in module order.

    Example:
        >>> import fmaml
        >>> list(fmaml.params_of(fmaml.nn.mlp()))[:2]
        ['body.0.weight', 'body.0.bias']
    """
    return {
        name: p.detach().clone().requires_grad_(True)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


class SupervisedLoss:
    """``loss(params, (x, y)) = criterion(model(x; params), y)``, via ``functional_call``.

    Built by :func:`supervised_loss`. Holds a private copy of the model in which every
    ``nn.BatchNorm*`` is replaced by :class:`fmaml.nn.BatchNorm` (batch statistics, as MAML
    uses them; exact second-order gradients under ``vmap``), and the model's buffers and
    frozen parameters, which it passes alongside ``params`` so that
    ``functional_call(..., strict=True)`` never falls back to a module tensor silently.
    """

    def __init__(self, model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor]):
        self.module = with_batch_statistics(model)
        self.criterion = criterion
        self.fixed = {
            **{k: b.detach() for k, b in self.module.named_buffers()},
            **{k: p.detach() for k, p in self.module.named_parameters() if not p.requires_grad},
        }
        self.param_names = [k for k, p in self.module.named_parameters() if p.requires_grad]

    def predict(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The model's output for ``x: [n, *feature]`` under ``params``."""
        self._check_keys(params)
        return torch.func.functional_call(self.module, {**self.fixed, **params}, (x,), strict=True)

    def __call__(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        x, y = batch
        return self.criterion(self.predict(params, x), y)

    def with_criterion(self, criterion: Callable[[Tensor, Tensor], Tensor]) -> SupervisedLoss:
        """The same model with another criterion (e.g. a metric for evaluation)."""
        other = object.__new__(SupervisedLoss)
        other.module, other.fixed, other.param_names = self.module, self.fixed, self.param_names
        other.criterion = criterion
        return other

    def _check_keys(self, params: Mapping[str, Tensor]) -> None:
        missing = [k for k in self.param_names if k not in params]
        unexpected = [k for k in params if k not in set(self.param_names)]
        if missing or unexpected:
            raise ValueError(
                "supervised_loss(): `params` does not match the model's trainable parameters.\n"
                f"  missing:    {missing}\n"
                f"  unexpected: {unexpected}\n"
                "Build params with fmaml.params_of(model) from the same model."
            )


def supervised_loss(
    model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor]
) -> SupervisedLoss:
    """A pure loss function ``(params, (x, y)) -> scalar`` for any ``nn.Module``.

    Args:
        model: the network; its parameter names are the keys of ``params``.
        criterion: ``criterion(output, y) -> scalar``, e.g. ``F.cross_entropy``,
            ``F.mse_loss`` or :func:`fmaml.accuracy`.

    Returns:
        A :class:`SupervisedLoss`; call it as ``loss(params, (x, y))``.

    Example:
        >>> import torch, torch.nn.functional as F, fmaml
        >>> model = fmaml.nn.mlp()
        >>> loss = fmaml.supervised_loss(model, F.mse_loss)
        >>> loss(fmaml.params_of(model), (torch.zeros(3, 1), torch.zeros(3, 1))).shape
        torch.Size([])
    """
    return SupervisedLoss(model, criterion)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of rows whose arg-max equals the label; ``logits: [n, classes]``, ``y: [n]``."""
    return (logits.argmax(dim=-1) == y).to(logits.dtype).mean()
