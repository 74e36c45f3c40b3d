"""What a meta-batch's execution can be, and the fastest choice per device and model.

A :class:`Strategy` decides how :func:`fmaml.value_and_grad` groups the tasks of a
meta-batch (one vmap, chunks, one at a time), on which threads, whether inner steps are
stored or recomputed, and whether the step is compiled; never what is computed.
:func:`auto_strategy` picks one. The runner is :mod:`fmaml.engine.run`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fmaml.types import LossFn


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


def auto_strategy(
    device: torch.device | str = "cpu",
    loss_fn: LossFn | None = None,
    *,
    num_tasks: int | None = None,
    examples_per_task: int | None = None,
) -> Strategy:
    """The fastest strategy fmaml knows for ``device`` and the model behind ``loss_fn``.

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
