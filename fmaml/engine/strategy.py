"""What a meta-batch's execution can be, and the fastest choice per device and model.

A :class:`Strategy` decides how :func:`fmaml.value_and_grad` groups the tasks of a
meta-batch (one vmap, chunks, one at a time), on which threads, whether inner steps are
stored or recomputed, and whether the step is compiled; never what is computed.
:func:`auto_strategy` picks one, for speed or, given a memory budget, the fastest whose
estimated peak fits (:func:`plan_memory`, measured by :mod:`fmaml.engine.memory`). The
runner is :mod:`fmaml.engine.run`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fmaml.engine.memory import BACKWARD_FACTOR, FIXED, Footprint, estimate, measure, size
from fmaml.errors import InputError, public
from fmaml.inner_loop import InnerLoop
from fmaml.objectives import check_meta_batch, check_objective
from fmaml.types import LossFn, Task

CUDA_MARGIN = 0.1
"""The share of the free CUDA memory left out of the default budget (allocator, cuDNN)."""


@dataclass(frozen=True)
class Strategy:
    """How :func:`fmaml.value_and_grad` runs a meta-batch; the result does not depend on it.

    Args:
        chunk_size: tasks vmapped together, their gradients accumulated chunk by chunk;
            ``None``: all of them; ``1``: one at a time, without ``vmap`` (plain convolution
            and BatchNorm kernels, inner gradients by plain autograd).
        checkpoint: keep only each inner step's parameters and recompute the step (and each
            query loss) in the backward: the memory of one inner step instead of all of
            them, for one more pass per step.
        workers: CPU threads working on different chunks at once (1: none besides the
            caller); each gets ``threads // workers`` intra-op threads and its own copy of
            the model (needs losses from :func:`fmaml.supervised_loss`).
        channels_last: one task at a time, query images ``[n, C, H, W]`` in channels-last
            layout (faster CPU convolutions; needs ``chunk_size=1``).
        threads: torch's intra-op threads while the meta-batch runs; ``None``: as set.
        compile: compile the meta-step with ``torch.compile`` (needs ``chunk_size=None``,
            one worker, no ``checkpoint``; not for models with BatchNorm or padded tasks).

    Every strategy is exact or refused: :func:`fmaml.value_and_grad` returns the gradients
    of :func:`fmaml.meta_loss`, the definition, for every input it names (tested in float64
    in ``tests/test_strategy.py``), and refuses what it can't do exactly: inputs computed
    from one another, tasks that require grad, a call inside ``torch.func`` transforms.

    Example:
        >>> str(Strategy(chunk_size=1, workers=2))
        'one task at a time, 2 workers'
    """

    chunk_size: int | None = None
    checkpoint: bool = False
    workers: int = 1
    channels_last: bool = False
    threads: int | None = None
    compile: bool = False

    def __post_init__(self):
        for name in ("chunk_size", "workers", "threads"):
            value = getattr(self, name)
            if value is None and name != "workers":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"Strategy(): `{name}` must be an integer of at least 1"
                    f"{'' if name == 'workers' else ' or None'}, got {value!r}."
                )
        if self.channels_last and self.chunk_size != 1:
            raise ValueError(
                "Strategy(): `channels_last` applies to one task at a time; set chunk_size=1 "
                f"(got chunk_size={self.chunk_size!r})."
            )
        if self.compile and (self.chunk_size is not None or self.workers > 1 or self.checkpoint):
            raise ValueError(
                "Strategy(): `compile` compiles one vmap over all tasks; set chunk_size=None, "
                f"workers=1 and checkpoint=False (got chunk_size={self.chunk_size!r}, "
                f"workers={self.workers}, checkpoint={self.checkpoint})."
            )

    def __str__(self) -> str:
        size = self.chunk_size
        parts = [
            "vmap over all tasks"
            if size is None
            else "one task at a time"
            if size == 1
            else f"vmap over chunks of {size} tasks",
            "inner steps recomputed" * self.checkpoint,
            f"{self.workers} workers" * (self.workers > 1),
            "channels-last" * self.channels_last,
            "compiled" * self.compile,
            f"{self.threads} intra-op thread{'s' * (self.threads > 1)}" if self.threads else "",
        ]
        return ", ".join(p for p in parts if p)


SMALL_TASK = 20
"""Examples per task (support + query) up to which :func:`auto_strategy` vmaps chunks of
tasks on a CPU instead of running them one at a time."""


@public
def auto_strategy(
    device: torch.device | str = "cpu",
    loss_fn: LossFn | None = None,
    *,
    num_tasks: int | None = None,
    examples_per_task: int | None = None,
    memory_budget: int | None = None,
    params: Mapping[str, Tensor] | None = None,
    tasks: Task | None = None,
    inner: InnerLoop | None = None,
    objective: object = "query",
) -> Strategy:
    """The fastest strategy fmaml knows for ``device`` and the model behind ``loss_fn``;
    with ``memory_budget``, the fastest whose estimated peak fits it (:func:`plan_memory`).

    - CUDA: one vmap over all tasks (large batched kernels, few launches).
    - CPU, convolutional model, tasks of up to :data:`SMALL_TASK` examples: one worker
      thread per core it may use (``torch.get_num_threads()``, at most
      :func:`available_cores` and ``num_tasks``), each vmapping its share of the tasks on one
      intra-op thread (one task's few images are too small to split across threads).
    - CPU, convolutional model, larger tasks or sizes not given: one task at a time without
      ``vmap`` (plain kernels instead of slow grouped convolutions), each op on all of
      torch's intra-op threads, query images channels-last; one task's graph alive at a time.
    - CPU, any other model (an MLP): one vmap over all tasks on one intra-op thread.

    The figures behind these choices are in ``benchmarks/README.md``.

    Args:
        device: where the meta-batch runs.
        loss_fn: the loss whose ``module`` (as :func:`fmaml.supervised_loss` has) is
            inspected for convolutions; other losses count as convolution-free.
        num_tasks: tasks per meta-batch (for the chunk size of small tasks).
        examples_per_task: support plus query examples of one task.
        memory_budget: bytes one meta-step may use above the process at rest; then
            ``params``, ``tasks`` (the actual meta-batch), ``inner`` and ``objective`` are
            needed, to measure one task (see :func:`plan_memory`).

    Raises:
        TypeError: ``memory_budget`` without ``params``, ``tasks`` and ``inner``.
        fmaml.errors.InputError: no plan fits ``memory_budget`` (see :func:`plan_memory`).

    Example:
        >>> import torch.nn.functional as F, fmaml
        >>> loss_fn = fmaml.supervised_loss(fmaml.nn.conv4(5), F.cross_entropy)
        >>> auto_strategy("cuda", loss_fn) == Strategy()
        True
        >>> auto_strategy("cpu", loss_fn).chunk_size
        1
        >>> small = auto_strategy("cpu", loss_fn, num_tasks=32, examples_per_task=10)
        >>> small.chunk_size == -(-32 // small.workers)  # one chunk of small tasks per worker
        True
    """
    if memory_budget is not None:
        if params is None or tasks is None or inner is None:
            raise TypeError(
                "auto_strategy(): a memory_budget is planned by measuring one task of the "
                "meta-batch; pass params=, tasks= and inner= too (or call fmaml.plan_memory)."
            )
        plan = plan_memory(
            loss_fn, params, tasks, inner, memory_budget=memory_budget, objective=objective
        )
        return plan.strategy
    if torch.device(device).type == "cuda":
        return Strategy()
    module = getattr(loss_fn, "module", None)
    convolutional = isinstance(module, torch.nn.Module) and any(
        isinstance(m, torch.nn.modules.conv._ConvNd) for m in module.modules()
    )
    if not convolutional:
        return Strategy(threads=1)
    if num_tasks is None or examples_per_task is None or examples_per_task > SMALL_TASK:
        return Strategy(chunk_size=1, channels_last=True)
    workers = max(1, min(torch.get_num_threads(), available_cores(), num_tasks))
    return Strategy(chunk_size=-(-num_tasks // workers), workers=workers)


def available_cores() -> int:
    """The CPU cores this process may run on: its CPU affinity where the OS reports one
    (Linux), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on this OS
        return os.cpu_count() or 1


class MemoryPlan(NamedTuple):
    """A strategy and the estimated peak of one meta-step under it (bytes above the process
    at rest), with the budget it was chosen for (``None``: none)."""

    strategy: Strategy
    estimate: int
    budget: int | None

    def __str__(self) -> str:
        budget = "no budget" if self.budget is None else f"a budget of {size(self.budget)}"
        return f"{self.strategy}: about {size(self.estimate)} ({budget})"


@public
def plan_memory(
    loss_fn: LossFn,
    params: dict[str, Tensor],
    tasks: Task,
    inner: InnerLoop,
    *,
    memory_budget: int | None = None,
    strategy: Strategy | None = None,
    objective: object = "query",
) -> MemoryPlan:
    """The fastest strategy for this meta-batch whose estimated peak fits ``memory_budget``.

    Candidates, fastest first: :func:`fmaml.auto_strategy`'s choice for the device and model;
    fewer tasks at a time (chunks halved down to one task, workers dropped); then the same
    with every inner step recomputed. Without a budget (on a CPU, where none is assumed) the
    first is chosen; on CUDA the default budget is the free device memory less
    :data:`CUDA_MARGIN`. With ``strategy`` given, that one is estimated, not chosen.

    Args:
        loss_fn, params, tasks, inner, objective: as in :func:`fmaml.value_and_grad`.
        memory_budget: bytes one meta-step may use above the process at rest.
        strategy: estimate this strategy instead of choosing one.

    Returns:
        A :class:`MemoryPlan`: the strategy, its estimated peak and the budget.

    Raises:
        fmaml.errors.InputError: (a ``ValueError``) no candidate fits the budget, with the
            smallest estimate, the budget and what would fit; a budget that is not a
            positive int.

    Example:
        >>> import torch, torch.nn.functional as F, fmaml
        >>> model = fmaml.nn.conv4(3, hidden=4, image_size=12)
        >>> loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
        >>> x, y = torch.randn(4, 6, 1, 12, 12), torch.arange(3).repeat(2).expand(4, -1)
        >>> tasks = fmaml.Task((x, y), (x, y))
        >>> plan = fmaml.plan_memory(loss_fn, fmaml.params_of(model), tasks,
        ...                          fmaml.InnerLoop(0.4, num_steps=5), memory_budget=10**9)
        >>> plan.estimate <= plan.budget
        True
    """
    objective = check_objective(objective)
    num_tasks = check_meta_batch(loss_fn, params, tasks, inner, objective)
    device = tasks.support[0].device
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1
    ):
        raise InputError(
            f"plan_memory(): `memory_budget` must be a positive int of bytes, got "
            f"{memory_budget!r}. Write 6 * 10**9 for 6 GB."
        )
    if memory_budget is None and strategy is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        memory_budget = int(free * (1 - CUDA_MARGIN))
    footprint = measure(loss_fn, params, tasks, inner, objective)
    if strategy is not None:
        return MemoryPlan(strategy, estimate(footprint, strategy, num_tasks), memory_budget)
    examples = tasks.support[0].shape[1] + tasks.query[0].shape[1]
    fastest = auto_strategy(device, loss_fn, num_tasks=num_tasks, examples_per_task=examples)
    plans = [
        MemoryPlan(s, estimate(footprint, s, num_tasks), memory_budget)
        for s in candidates(fastest, num_tasks)
    ]
    fitting = [p for p in plans if memory_budget is None or p.estimate <= memory_budget]
    if not fitting:
        raise InputError(_refusal(min(plans, key=lambda p: p.estimate), footprint, inner))
    return fitting[0]


def candidates(fastest: Strategy, num_tasks: int) -> list[Strategy]:
    """``fastest``, then fewer tasks at a time, then each of those with steps recomputed."""
    sizes = []
    if fastest.chunk_size != 1:
        size = num_tasks if fastest.chunk_size is None else fastest.chunk_size
        while size > 1:
            size = (size + 1) // 2
            sizes.append(size)
    smaller = [dataclasses.replace(fastest, workers=1)] if fastest.workers > 1 else []
    for size in sizes:
        smaller.append(
            dataclasses.replace(
                fastest, chunk_size=size, workers=1, channels_last=False, compile=False
            )
        )
    plain = [fastest, *smaller]
    recomputed = [dataclasses.replace(s, checkpoint=True, compile=False) for s in plain]
    unique: dict[str, Strategy] = {}
    for s in [*plain, *recomputed]:
        unique.setdefault(str(s), s)
    return list(unique.values())


def _refusal(smallest: MemoryPlan, footprint: Footprint, inner: InnerLoop) -> str:
    """What no plan fitting says: the numbers, and what would fit."""
    others = len(footprint.pieces) - inner.num_steps  # the head and query pieces
    room = smallest.budget - FIXED[False] - 3 * footprint.params
    room = room / BACKWARD_FACTOR - max(footprint.pieces)
    steps = max(0, int(room // footprint.carry) - others) if footprint.carry else 0
    fewer = (
        f"fewer inner steps (about {steps} of {inner.num_steps}, every step recomputed), "
        if 0 < steps < inner.num_steps
        else ""
    )
    return (
        f"plan_memory(): no plan fits the memory budget of {size(smallest.budget)}: the "
        f"smallest, {smallest.strategy}, needs about {size(smallest.estimate)}. What would "
        f"fit: {fewer}first_order=True (no inner step's graph is kept), a larger budget, or "
        "a smaller meta-batch per process on more processes (torchrun)."
    )
