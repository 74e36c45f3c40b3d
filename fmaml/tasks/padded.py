"""Tasks of different shapes (ways, shots, query sizes) in one meta-batch, padded with a mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fmaml.types import Task


def pad_tasks(tasks: Sequence[Task], *, num_ways: int | None = None) -> Task:
    r"""Stack tasks of different sizes into one meta-batch, padded, with masks.

    Each set becomes ``(x, y, mask)``: ``x`` and ``y`` padded with zeros after the real rows
    to the largest set of the meta-batch, ``mask`` ``True`` on the real rows. For
    classification tasks (``y`` 1-d integer labels ``0..w-1``, ``w`` the task's ways, every
    class in its support set) each set is ``(x, y, mask, classes)``, ``classes`` ``True`` on
    the first ``w`` of ``num_ways`` outputs. :func:`fmaml.supervised_loss` scores a padded
    set on its real rows only (BatchNorm statistics too), with the logits of the other
    classes at ``-inf``: a padded task's loss, accuracy and meta-gradient are those of the
    task alone, scored by the head's first ``w`` outputs. Every :class:`fmaml.Strategy`
    except ``compile`` runs such a meta-batch.

    Args:
        tasks: single tasks (no task axis), ``support = (x [n_s, *feature], y [n_s,
            *target])``, ``query`` likewise; ``n_s``, ``n_q`` and the ways may differ,
            ``feature``, ``target`` and dtypes may not.
        num_ways: outputs of the classifier's head (at least every task's ways); ``None``:
            the most ways of any task. Only for classification tasks.

    Returns:
        A :class:`fmaml.Task` with a leading task axis: ``support = (x [T, N_s, *feature],
        y [T, N_s, *target], mask [T, N_s] bool[, classes [T, num_ways] bool])``, ``query``
        likewise with ``N_q``.

    Raises:
        ValueError: no tasks; a task that is not ``Task((x, y), (x, y))``; a set with no
            example; features, targets or dtypes that differ between tasks; classification
            labels that are not ``0..w-1`` with every class in the support set, or query
            labels outside them; ``num_ways`` below a task's ways, or given for regression
            tasks.

    Example:
        >>> import torch, torch.nn.functional as F, fmaml
        >>> def task(ways, shots):
        ...     y = torch.arange(ways).repeat(shots)
        ...     return fmaml.Task((torch.randn(len(y), 2), y), (torch.randn(len(y), 2), y))
        >>> batch = fmaml.tasks.pad_tasks([task(3, 1), task(5, 2)])
        >>> [t.shape for t in batch.support]
        [torch.Size([2, 10, 2]), torch.Size([2, 10]), torch.Size([2, 10]), torch.Size([2, 5])]
        >>> batch.support[2].sum(1), batch.support[3].sum(1)
        (tensor([ 3, 10]), tensor([3, 5]))
        >>> model = fmaml.nn.mlp(in_features=2, hidden=(8,), out_features=5)
        >>> loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
        >>> fmaml.meta_loss(loss_fn, fmaml.params_of(model), batch, fmaml.InnerLoop(0.1)).shape
        torch.Size([])
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("pad_tasks(): got no tasks; pass a list of at least one fmaml.Task.")
    for i, task in enumerate(tasks):
        ok = isinstance(task, Task) and all(
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and all(isinstance(t, Tensor) and t.dim() >= 1 for t in pair)
            for pair in task
        )
        if not ok:
            raise ValueError(
                f"pad_tasks(): task {i} is not a single unpadded fmaml.Task((x, y), (x, y)) of "
                "tensors with a row per example. Pass tasks without a task axis or mask."
            )
    for part in ("support", "query"):
        sets = [getattr(task, part) for task in tasks]
        empty = [i for i, (x, y) in enumerate(sets) if x.shape[0] == 0 or y.shape[0] != x.shape[0]]
        if empty:
            raise ValueError(
                f"pad_tasks(): task(s) {empty} have an empty {part} set, or x and y with "
                f"different numbers of rows: every task needs at least one {part} example, "
                "one label per x."
            )
    classification = all(
        not t.is_floating_point() and not t.is_complex() and t.dim() == 1
        for task in tasks
        for _, t in task
    )
    ways = _ways(tasks) if classification else None
    if num_ways is not None:
        if ways is None:
            raise ValueError(
                "pad_tasks(): `num_ways` pads the classes of classification tasks (1-d integer "
                "labels), but these tasks' labels are not. Leave num_ways=None."
            )
        if num_ways < max(ways):
            raise ValueError(
                f"pad_tasks(): `num_ways` is {num_ways} but a task has {max(ways)} ways. Give "
                "the head's outputs, at least the most ways of any task."
            )
    width = None if ways is None else (num_ways or max(ways))
    support = _pad_sets([task.support for task in tasks], "support", ways, width)
    query = _pad_sets([task.query for task in tasks], "query", ways, width)
    return Task(support, query)


def _ways(tasks: list[Task]) -> list[int]:
    """Each task's ways, its support labels checked to be ``0..w-1`` (all present) and its
    query labels within them."""
    ways = []
    for i, task in enumerate(tasks):
        labels = task.support[1]
        present = sorted(set(labels.tolist()))
        if present != list(range(len(present))):
            raise ValueError(
                f"pad_tasks(): task {i}'s support labels must be 0..w-1 with every class "
                f"present (w its ways), got the classes {present}. Relabel each task's "
                "classes 0..w-1, as fmaml.tasks.EpisodeSampler does."
            )
        query = set(task.query[1].tolist())
        if not query <= set(present):
            raise ValueError(
                f"pad_tasks(): task {i}'s query labels {sorted(query - set(present))} are not "
                f"among its support classes 0..{len(present) - 1}."
            )
        ways.append(len(present))
    return ways


def _pad_sets(sets: list, part: str, ways: list[int] | None, width: int | None) -> tuple:
    """``(x, y, mask[, classes])`` stacked over tasks, padded after the real rows."""
    for index in (0, 1):
        name = "xy"[index]
        kinds = {(tuple(s[index].shape[1:]), s[index].dtype, s[index].device) for s in sets}
        if len(kinds) > 1:
            listing = ", ".join(
                f"{list(s[index].shape[1:])} {s[index].dtype}" for s in sets[: len(sets)]
            )
            raise ValueError(
                f"pad_tasks(): the {part} {name} of every task must have the same shape after "
                f"the example axis, dtype and device; got {listing}. Only the number of "
                "examples may differ."
            )
    sizes = [s[0].shape[0] for s in sets]
    rows = max(sizes)
    xs, ys, masks = [], [], []
    for (x, y), n in zip(sets, sizes, strict=True):
        xs.append(torch.cat([x, x.new_zeros(rows - n, *x.shape[1:])]))
        ys.append(torch.cat([y, y.new_zeros(rows - n, *y.shape[1:])]))
        masks.append(torch.arange(rows, device=x.device) < n)
    padded = (torch.stack(xs), torch.stack(ys), torch.stack(masks))
    if ways is None:
        return padded
    device = sets[0][0].device
    classes = torch.stack([torch.arange(width, device=device) < w for w in ways])
    return (*padded, classes)
