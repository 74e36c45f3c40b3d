"""Padded sets: tasks of different sizes in one meta-batch, a mask marking the real rows.

A set of one task is ``(x, y)``, or padded ``(x, y, mask)`` or ``(x, y, mask, classes)``:

- ``mask: [n]`` bool, ``True`` on the real examples. Padded rows change nothing: not the
  loss or score (a mean over the real rows), not the BatchNorm statistics, not a gradient.
- ``classes: [C]`` bool, ``True`` on the outputs (classes) of this task, for a classifier
  whose head has ``C >= num_ways`` outputs: the logits of the other classes are set to
  ``-inf`` before the criterion, so a 3-way task scored by a 5-output head is the 3-way
  task of the head's first 3 rows (the other rows get a zero gradient).

:func:`fmaml.tasks.pad_tasks` builds such a meta-batch from a list of tasks;
:func:`fmaml.supervised_loss` scores it. This module holds the checks: structure where a set
is used (safe under ``vmap``), values where a meta-batch enters :func:`fmaml.meta_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fmaml.types import Task


def is_padded(batch) -> bool:
    """Whether a set carries a mask: ``(x, y, mask)`` or ``(x, y, mask, classes)``."""
    return isinstance(batch, (tuple, list)) and len(batch) in (3, 4)


def unpack(batch, caller: str) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(x, y, mask, classes or None)`` of a padded set of one task, its structure checked.

    Raises:
        ValueError: a set that is not ``(x, y, mask[, classes])``, a mask that is not bool
            ``[n]`` for ``x: [n, ...]``, ``classes`` that is not bool 1-d.
    """
    if not is_padded(batch):
        length = len(batch) if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise ValueError(
            f"{caller}(): a padded set is (x, y, mask) or (x, y, mask, classes), got {length} "
            "items. Build padded tasks with fmaml.tasks.pad_tasks."
        )
    x, y, mask, *rest = batch
    classes = rest[0] if rest else None
    rows = x.shape[0] if x.dim() else None
    if mask.dtype is not torch.bool or mask.dim() != 1 or mask.shape[0] != rows:
        raise ValueError(
            f"{caller}(): a set's `mask` must be bool [n] for x [n, ...] (one flag per "
            f"example, True on the real ones), got {mask.dtype} {list(mask.shape)} for x "
            f"{list(x.shape)}. Build padded tasks with fmaml.tasks.pad_tasks."
        )
    if y.dim() == 0 or y.shape[0] != rows:
        raise ValueError(
            f"{caller}(): a padded set's y must have one row per example of x, got y "
            f"{list(y.shape)} for x {list(x.shape)}."
        )
    if classes is not None and (classes.dtype is not torch.bool or classes.dim() != 1):
        raise ValueError(
            f"{caller}(): a set's `classes` must be bool [C] (True on the task's classes "
            f"among the head's C outputs), got {classes.dtype} {list(classes.shape)}."
        )
    return x, y, mask, classes


def check_padded_tasks(tasks: Task, caller: str) -> bool:
    """Check a meta-batch's padded sets (structure and values, outside ``vmap``); return
    whether any set is padded.

    Raises:
        ValueError: a task with no real support or query example, or (with ``classes``) no
            class; a mask or ``classes`` of the wrong shape or dtype (see :func:`unpack`).
    """
    padded = False
    for part in ("support", "query"):
        batch = getattr(tasks, part)
        if not is_padded(batch):
            continue
        padded = True
        x, mask, classes = batch[0], batch[2], (batch[3] if len(batch) > 3 else None)
        if mask.dtype is not torch.bool or mask.dim() != 2 or mask.shape != x.shape[:2]:
            raise ValueError(
                f"{caller}(): the {part} `mask` must be bool [num_tasks, n] for x "
                f"[num_tasks, n, ...], got {mask.dtype} {list(mask.shape)} for x "
                f"{list(x.shape)}. Build padded tasks with fmaml.tasks.pad_tasks."
            )
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"{caller}(): task(s) {empty} have no real {part} example (their {part} mask "
                f"is all False): their {part} loss would be 0/0. Give every task at least one "
                f"{part} example, or leave those tasks out."
            )
        if classes is not None:
            if classes.dtype is not torch.bool or classes.dim() != 2:
                raise ValueError(
                    f"{caller}(): the {part} `classes` must be bool [num_tasks, C], got "
                    f"{classes.dtype} {list(classes.shape)}."
                )
            none = (~classes.any(dim=1)).nonzero().flatten().tolist()
            if none:
                raise ValueError(
                    f"{caller}(): task(s) {none} have no class (their {part} `classes` is "
                    "all False). Mark the task's classes True."
                )
    return padded
