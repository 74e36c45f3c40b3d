"""The data types every part of fmaml shares: parameter dicts, batches and tasks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

Params = dict[str, Tensor]
"""Parameters keyed by the module's own names, e.g. ``{"head.weight": tensor, ...}``."""

Batch = tuple[Tensor, ...]
"""One set of examples ``(x, y)``: ``x: [n, *feature]``, ``y: [n, *target]``; padded,
``(x, y, mask)`` or ``(x, y, mask, classes)`` with ``mask: [n]`` bool (``True`` on the real
examples) and ``classes: [C]`` bool (the task's classes among the head's outputs): see
:mod:`fmaml.padding` and :func:`fmaml.tasks.pad_tasks`."""

LossFn = Callable[[Mapping[str, Tensor], Batch], Tensor]
"""``loss_fn(params, (x, y)) -> scalar``: a pure function of the parameters and a batch."""


class Task(NamedTuple):
    """A few-shot task: a support set to adapt on and a query set to score on.

    A single task holds ``support = (x, y)`` with ``x: [num_support, *feature]``.
    A meta-batch holds the same fields with a leading task axis,
    ``x: [num_tasks, num_support, *feature]``; :func:`fmaml.meta_loss` vmaps over it.
    Tasks of different sizes (ways, shots, query) share a meta-batch padded, each set
    ``(x, y, mask[, classes])``: :func:`fmaml.tasks.pad_tasks` builds it.

    Example:
        >>> import torch
        >>> from fmaml import Task
        >>> task = Task(support=(torch.zeros(5, 1), torch.zeros(5, 1)),
        ...             query=(torch.zeros(10, 1), torch.zeros(10, 1)))
        >>> task.support[0].shape
        torch.Size([5, 1])
    """

    support: Batch
    query: Batch


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """What a loss declares about how the inner loop must call it; changed with
    ``dataclasses.replace`` (a new value), never set on the loss afterwards.

    :func:`fmaml.supervised_loss` losses hold one as ``loss_fn.options`` (their
    ``with_support_statistics``, ``with_autocast`` and :func:`fmaml.per_step` return new
    losses with it changed); :func:`options_of` reads it, and any other callable has the
    defaults.

    Attributes:
        stepwise: the loss takes the inner step, ``loss_fn(params, batch, step=s)``
            (MAML++ per-step BatchNorm weights, :func:`fmaml.per_step`).
        per_step_keys: the parameters with one slot per inner step.
        support_statistics: the query's BatchNorm statistics come from the task's support
            set, ``loss_fn(params, query, stats_from=support)`` (MAML++ BNRS, leak-free);
            ``False``: from the batch itself (MAML's transductive default).
        autocast: the dtype of the model's forward pass under ``torch.autocast`` (mixed
            precision); ``None``: the parameters' dtype throughout.

    Example:
        >>> options_of(lambda params, batch: 0.0)
        LossOptions(stepwise=False, per_step_keys=(), support_statistics=False, autocast=None)
    """

    stepwise: bool = False
    per_step_keys: tuple[str, ...] = ()
    support_statistics: bool = False
    autocast: torch.dtype | None = None


def options_of(loss_fn: LossFn) -> LossOptions:
    """The :class:`LossOptions` ``loss_fn`` declares (its ``options``), else the defaults."""
    options = getattr(loss_fn, "options", None)
    return options if isinstance(options, LossOptions) else LossOptions()
