"""The data types every part of fmaml shares: parameter dicts, batches and tasks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

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
