"""What a meta-step holds in memory, estimated from one task of the actual meta-batch.

:func:`measure` finds what one task of the actual meta-batch holds for the backward:
it runs the task's inner loop once, piece by piece (the prototype head, each inner step,
each scored query loss; :data:`fmaml.adapt.Call`), and adds up the bytes of the tensors
autograd saves for each piece (``torch.autograd.graph.saved_tensors_hooks``: the same on
every device) and of the parameters each step carries. Each piece's graph is dropped before
the next, so measuring never holds more than one piece. From these:

- a plan that keeps every step's graph holds all of a task's pieces at once;
- a plan that recomputes the pieces (``Strategy(checkpoint=True)``) holds every step's
  adapted parameters and one piece's graph;
- ``c`` tasks vmapped together (and ``workers`` threads) hold ``c`` (times ``workers``)
  tasks' worth; the parameters and their gradients come on top.

Each figure is multiplied by :data:`BACKWARD_FACTOR` (:data:`VMAP_FACTOR` for vmapped
chunks) for what the backward allocates while the saved tensors are alive, and
:data:`FIXED` is added. The estimate errs high: ``benchmarks/memory_steps.py`` measures it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from fmaml.adapt import autograd_grad
from fmaml.inner_loop import InnerLoop
from fmaml.objectives import task_loss
from fmaml.types import LossFn, Task

BACKWARD_FACTOR = 1.5
"""Peak over saved bytes, one task at a time: the gradients the backward allocates while
saved tensors are still alive."""

VMAP_FACTOR = 3.0
"""The same for vmapped chunks: batched kernels (grouped convolutions) keep more on the side."""

FIXED = {False: 192 * 10**6, True: 256 * 10**6}
"""Bytes on top, one task at a time (``False``) or vmapped (``True``): the allocator's and
the kernels' own buffers. These three constants were fitted to conv4 on Omniglot 20-way and
mini-ImageNet 5-way on a 2-core CPU (``benchmarks/memory_steps.py``), rounded up."""


ALLOCATOR_SLACK = 0.1
"""Per recomputed inner step, this share of one step's graph stays resident after it is freed
(glibc's allocator keeps freed buffers it can't give back: mini-ImageNet, 100 recomputed
steps, 810 MB measured for 580 MB of live tensors at most)."""


class Footprint(NamedTuple):
    """What one task holds for the backward, in bytes."""

    pieces: list[int]  # saved by each piece of the inner loop (head, steps, query losses)
    carry: int  # the adapted parameters (and inner-optimiser state) one step keeps
    params: int  # the meta-parameters (their gradients take as much again)
    slack: int = 0  # recomputed steps: what the allocator keeps of the graphs it freed

    def task(self, checkpoint: bool, vmapped: bool = False) -> int:
        """One task: every piece's graph at once, or every step's carry and one piece (three
        under ``vmap``, whose batched backward keeps more beside it)."""
        if not checkpoint:
            return sum(self.pieces)
        largest = max(self.pieces, default=0)
        return self.carry * len(self.pieces) + (1 + 2 * vmapped) * largest + self.slack


def estimate(footprint: Footprint, strategy, num_tasks: int) -> int:
    """The estimated peak bytes of one meta-step under ``strategy`` (a Strategy)."""
    chunk = num_tasks if strategy.chunk_size is None else min(strategy.chunk_size, num_tasks)
    at_once = min(num_tasks, chunk * strategy.workers)
    vmapped = strategy.chunk_size != 1
    per_task = footprint.task(strategy.checkpoint, vmapped)
    factor = VMAP_FACTOR if vmapped else BACKWARD_FACTOR
    return int(FIXED[vmapped] + factor * at_once * per_task + 3 * footprint.params)


def measure(loss_fn: LossFn, params, tasks: Task, inner: InnerLoop, objective) -> Footprint:
    """The :class:`Footprint` of the first task of ``tasks``, measured piece by piece."""
    task = Task(*(tuple(t[0] for t in pair) for pair in tasks))
    resident = {t.untyped_storage().data_ptr() for t in tree_flatten((params, tasks))[0]}
    pieces: list[int] = []
    carries: list[int] = []

    def saved(run):
        found: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in resident:
                found[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        return sum(found.values()), out

    def call(piece, carry, data, shared=False):
        carry = tree_map(_fresh_leaf, carry)
        size, out = saved(lambda: piece(carry, data))
        pieces.append(size)
        flat = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        carries.append(sum(t.untyped_storage().nbytes() for t in flat))
        return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)

    if objective == "query":
        task_loss(loss_fn, params, task, inner, grad=autograd_grad, call=call)
    else:  # Reptile, iMAML: no inner step is differentiated; one piece
        size, _ = saved(lambda: task_loss(loss_fn, params, task, inner, objective=objective))
        pieces.append(size)
    param_bytes = sum(t.untyped_storage().nbytes() for t in params.values())
    steps = max(1, inner.num_steps)
    head = int(objective == "query" and inner.head_init is not None)
    step = max(pieces[head : head + inner.num_steps], default=0)
    slack = int(ALLOCATOR_SLACK * inner.num_steps * step)
    return Footprint(pieces, max(carries[:steps], default=0), param_bytes, slack)


def _fresh_leaf(t):
    if not isinstance(t, Tensor):
        return t
    return t.detach().requires_grad_(t.is_floating_point())  # the meta-gradient flows here


def size(num_bytes: int) -> str:
    """``num_bytes`` for people: ``"1.2 GB"``."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"
