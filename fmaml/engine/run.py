"""The runner: :func:`value_and_grad` computes a meta-batch under a :class:`Strategy`.

Every strategy runs the one inner loop (:func:`fmaml.adapt.trajectory`, through
:func:`fmaml.task_loss`) with a policy around it: which tasks are vmapped together, on which
thread, ``torch.func.grad`` or plain autograd for the inner gradient, pieces recomputed in
the backward (:func:`fmaml.recompute.recomputing`), compiled or not. Each chunk's gradients
are taken at once and summed: one chunk's graph is alive at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from fmaml.adapt import autograd_grad, func_grad
from fmaml.engine.strategy import Strategy, auto_strategy
from fmaml.errors import public
from fmaml.graph import check_independent, depends_on
from fmaml.inner_loop import InnerLoop
from fmaml.inner_optim import InnerOptimizer
from fmaml.module import SupervisedLoss
from fmaml.nn.batchnorm import has_batchnorm
from fmaml.objectives import check_meta_batch, check_objective, meta_loss, over_tasks, task_loss
from fmaml.padding import is_padded
from fmaml.proto import HEAD_KEYS
from fmaml.recompute import recomputing
from fmaml.tree import select, tensors_in
from fmaml.types import LossFn, Task


class MetaGradients(NamedTuple):
    """What :func:`value_and_grad` differentiates, each gradient in its input's place.

    A number, or a tensor that does not require grad, has ``None`` in its place.
    """

    params: dict[str, Tensor | None]
    inner_lr: object
    step_weights: object
    wrt: list[Tensor | None]


@public
def value_and_grad(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    tasks: Task,
    inner: InnerLoop,
    *,
    wrt: Sequence[Tensor] = (),
    strategy: Strategy | None = None,
    score_fn: LossFn | None = None,
    objective: object = "query",
) -> tuple[Tensor, MetaGradients] | tuple[Tensor, MetaGradients, Tensor]:
    r"""The meta-loss of :func:`fmaml.meta_loss` and its meta-gradients, the fast way.

    In the spirit of ``jax.value_and_grad``: returns the value (detached) and the gradients
    of exactly the inputs given: ``params``, the tensors of ``inner.inner_lr`` (Meta-SGD,
    LSLR) and ``inner.step_weights`` that require grad, and the tensors in ``wrt`` (tensors
    the loss captures, e.g. a learned temperature, or leaves they are computed from). The
    meta-batch runs with ``strategy``, by default :func:`fmaml.auto_strategy`'s choice for the
    device, the model and the cores; every strategy gives the gradients of the definition
    (``tests/test_strategy.py``, float64). For second derivatives, differentiate
    :func:`fmaml.meta_loss` itself.

    Args:
        loss_fn, params, tasks, inner, score_fn, objective: as in :func:`fmaml.meta_loss`.
        wrt: more tensors to differentiate: leaves, or tensors computed from leaves.
        strategy: how to run the meta-batch; ``None``: :func:`fmaml.auto_strategy`'s choice.

    Returns:
        ``(loss, grads)``, and the mean score too when ``score_fn`` is given: ``loss`` a
        detached 0-d tensor, ``grads`` a :class:`MetaGradients`.

    Raises:
        ValueError: everything :func:`fmaml.meta_loss` raises; an input computed from
            another input (its gradient would be counted twice); tasks that require grad;
            what a strategy can't do (see :class:`fmaml.Strategy`).
        RuntimeError: called inside a ``torch.func`` transform.

    Example:
        >>> import torch, torch.nn.functional as F, fmaml
        >>> model = fmaml.nn.mlp()
        >>> params = fmaml.params_of(model)
        >>> loss_fn = fmaml.supervised_loss(model, F.mse_loss)
        >>> tasks = fmaml.tasks.SinusoidTasks(num_shots=5).sample(4, torch.Generator())
        >>> loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, fmaml.InnerLoop(0.01))
        >>> loss.requires_grad, grads.params["head.weight"].shape
        (False, torch.Size([1, 40]))
    """
    objective = check_objective(objective)
    num_tasks = check_meta_batch(loss_fn, params, tasks, inner, objective)
    if strategy is None:
        x_support, x_query = tasks.support[0], tasks.query[0]
        strategy = auto_strategy(
            x_support.device,
            loss_fn,
            num_tasks=num_tasks,
            examples_per_task=x_support.shape[1] + x_query.shape[1],
        )
    _refuse(strategy, loss_fn, params, tasks, inner)
    leaves, spec = tree_flatten((dict(params), inner.inner_lr, inner.step_weights, list(wrt)))
    inputs = list({id(t): t for t in leaves if isinstance(t, Tensor) and t.requires_grad}.values())
    labels = {
        **{id(t): "a tensor of `wrt`" for t in inputs},
        **{id(t): "a tensor of `step_weights`" for t in tensors_in(inner.step_weights)},
        **{id(t): "a tensor of `inner_lr`" for t in tensors_in(inner.inner_lr)},
        **{id(t): f"params[{k!r}]" for k, t in params.items()},
    }
    check_independent(inputs, lambda t: f"{labels[id(t)]} (shape {list(t.shape)}, {t.dtype})")
    hyper = tensors_in(None if inner.inner_optimizer is None else inner.inner_optimizer.hyper)
    closure = [t for t in {id(t): t for t in [*inputs, *hyper]}.values() if t.requires_grad]
    closure = [t for t in closure if not depends_on(t, closure)]  # roots: none counted twice
    job = _Job(loss_fn, params, inner, score_fn, objective, num_tasks, inputs, closure, strategy)
    job = dataclasses.replace(job, retain=bool(wrt))
    with torch.enable_grad(), intra_op_threads(strategy.threads):
        if strategy.compile:
            value, grads, score = _compiled(job, tasks)
        else:
            value, grads, score = _run_chunks(job, tasks)
    found = {id(t): g for t, g in zip(inputs, grads, strict=True)}
    out = []
    for t in leaves:
        g = found.get(id(t)) if isinstance(t, Tensor) and t.requires_grad else None
        out.append(torch.zeros_like(t) if g is None and id(t) in found else g)
    meta = MetaGradients(*tree_unflatten(out, spec))
    return (value, meta) if score_fn is None else (value, meta, score)


@dataclasses.dataclass(frozen=True)
class _Job:
    """One meta-batch's work: the loss of a chunk of tasks and its gradients for ``inputs``."""

    loss_fn: LossFn
    params: Mapping[str, Tensor]
    inner: InnerLoop
    score_fn: LossFn | None
    objective: object
    num_tasks: int
    inputs: list
    closure: list  # the tensors a recomputed piece is differentiated for (roots only)
    strategy: Strategy
    retain: bool = False  # a tensor in `wrt` may share graph between chunks

    def on_own_module(self) -> _Job:
        """This job with losses whose modules are private copies (for another thread)."""
        copies = {}
        for name in ("loss_fn", "score_fn"):
            fn = getattr(self, name)
            if fn is None:
                continue
            if not isinstance(fn, SupervisedLoss):
                raise ValueError(
                    "value_and_grad(): Strategy(workers > 1) needs losses from "
                    f"fmaml.supervised_loss (it gives each thread its own copy of the model); "
                    f"got `{name}` of type {type(fn).__name__}. Use workers=1."
                )
            copies[name] = fn.on_private_module()  # the same tensors, a private module
        return dataclasses.replace(self, **copies)

    def losses(self, chunk: Task) -> tuple[Tensor, Tensor | None]:
        """The summed loss and score of a chunk, by the strategy's policy around the loop."""
        one = self.strategy.chunk_size == 1
        grad = autograd_grad if one else func_grad
        options = {"score_fn": self.score_fn, "objective": self.objective}
        if self.strategy.checkpoint and self.objective == "query" and self.inner.num_steps:
            call = recomputing(self.closure, batched=not one)
            out = task_loss(
                self.loss_fn, self.params, chunk, self.inner, grad=grad, call=call, **options
            )
        elif one:
            out = task_loss(self.loss_fn, self.params, chunk, self.inner, grad=grad, **options)
        else:
            out = over_tasks(
                lambda task: task_loss(self.loss_fn, self.params, task, self.inner, **options),
                chunk,
            )
        loss, score = (out, None) if self.score_fn is None else out
        return loss.sum(), None if score is None else score.sum()

    def run(self, chunk: Task) -> tuple[Tensor, list, Tensor | None]:
        loss, score = self.losses(chunk)
        share = loss / self.num_tasks
        grads = [None] * len(self.inputs)
        if self.inputs and share.requires_grad:
            grads = torch.autograd.grad(
                share, self.inputs, allow_unused=True, retain_graph=self.retain
            )
        return share.detach(), list(grads), None if score is None else score.detach()


def _run_chunks(job: _Job, tasks: Task) -> tuple:
    """Every chunk's (loss share, gradients, summed score), summed as they come. With
    ``workers`` threads, each runs its own chunks on its own copy of the model
    (``functional_call`` swaps a module's tensors while it runs), with its share of torch's
    intra-op threads."""
    strategy, n = job.strategy, job.num_tasks
    size = n if strategy.chunk_size is None else min(strategy.chunk_size, n)
    chunks = [_slice(tasks, i, min(i + size, n), strategy) for i in range(0, n, size)]
    workers = min(strategy.workers, len(chunks))
    if workers <= 1:
        value, grads, score = _accumulate(job.run(c) for c in chunks)
    else:
        copies = [job] + [job.on_own_module() for _ in range(workers - 1)]
        with intra_op_threads(max(1, torch.get_num_threads() // workers)):
            with ThreadPoolExecutor(max_workers=workers) as pool:
                parts = pool.map(
                    lambda w: _accumulate(copies[w].run(c) for c in chunks[w::workers]),
                    range(workers),
                )
                value, grads, score = _accumulate(list(parts))
    return value, grads, None if score is None else score / n


def _accumulate(results) -> tuple:
    """Sum (value, gradients, score) over chunks."""
    value, grads, score = None, None, None
    for v, g, s in results:
        value = v if value is None else value + v
        score = s if score is None else score + s
        grads = g if grads is None else [_add(a, b) for a, b in zip(grads, g, strict=True)]
    return value, grads, score


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _slice(tasks: Task, start: int, stop: int, strategy: Strategy) -> Task:
    """Tasks ``start:stop``; one task without its axis for ``chunk_size=1`` (query images
    channels-last if asked)."""
    if strategy.chunk_size != 1:
        return Task(*(tuple(t[start:stop] for t in pair) for pair in tasks))

    def layout(t: Tensor) -> Tensor:
        if strategy.channels_last and t.dim() == 4 and t.is_floating_point():
            return t.contiguous(memory_format=torch.channels_last)
        return t

    support, query = tasks
    return Task(tuple(t[start] for t in support), tuple(layout(t[start]) for t in query))


# --- compiled ---------------------------------------------------------------------------------

_COMPILED: dict[tuple, tuple] = {}
_COMPILED_CALL = threading.Lock()
"""Held while a compiled meta-step runs: it filters one warning of dynamo's in a
``warnings.catch_warnings()`` scope, and the warning filters are process-wide."""


def _compiled(job: _Job, tasks: Task) -> tuple:
    """The meta-step compiled once per loss and setting (kept for the life of the process,
    as torch.compile keeps its code). The tensors of the inner loop come in as arguments, so
    a learned rate or beta (a new tensor every step) does not compile again."""
    import torch._functorch.config as functorch_config

    inner, optimizer = job.inner, job.inner.inner_optimizer
    kind = None if optimizer is None else (optimizer.init, optimizer.update)
    base = inner.replace(inner_lr=None, step_weights=None, inner_optimizer=None)
    key = (id(job.loss_fn), id(job.score_fn), id(inner.adapt_keys), str(job.objective), kind)
    key += (inner.num_steps, inner.first_order, inner.head_init)
    if key not in _COMPILED:

        def step(params, inner_lr, step_weights, hyper, tasks, inputs, retain):
            loop = base.replace(
                inner_lr=inner_lr,
                step_weights=step_weights,
                inner_optimizer=None if kind is None else InnerOptimizer(*kind, hyper),
            )
            out = meta_loss(
                job.loss_fn, params, tasks, loop, score_fn=job.score_fn, objective=job.objective
            )
            loss, score = (out, None) if job.score_fn is None else out
            grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=retain)
            return loss.detach(), grads, None if score is None else score.detach()

        _COMPILED[key] = (torch.compile(step), job.loss_fn, job.score_fn, inner.adapt_keys)
    hyper = None if optimizer is None else dict(optimizer.hyper)
    with (
        _COMPILED_CALL,
        warnings.catch_warnings(),
        # the step may differentiate with retain_graph=True, which compiled backward
        # functions with donated buffers refuse
        functorch_config.patch(donated_buffer=False),
    ):
        # dynamo reads `.grad` of every tensor it wraps, non-leaves too: its access, not ours
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor")
        value, grads, score = _COMPILED[key][0](
            dict(job.params),
            inner.inner_lr,
            inner.step_weights,
            hyper,
            tasks,
            job.inputs,
            job.retain,
        )
    return value, list(grads), score


# --- refusals -----------------------------------------------------------------------------------


def _refuse(strategy: Strategy, loss_fn, params, tasks: Task, inner: InnerLoop) -> None:
    """Raise for what ``strategy`` can't compute exactly."""
    if not isinstance(strategy, Strategy):
        raise TypeError(
            f"value_and_grad(): `strategy` must be an fmaml.Strategy or None, got "
            f"{type(strategy).__name__}."
        )
    if torch._C._functorch.get_interpreter_stack():
        raise RuntimeError(
            "value_and_grad(): computes gradients with torch.autograd and can't run inside "
            "torch.func transforms (vmap, grad, ...). Call it outside them, or differentiate "
            "fmaml.meta_loss (the definition) instead."
        )
    if any(t.requires_grad for pair in tasks for t in pair):
        raise ValueError(
            f"value_and_grad(): strategy {strategy} differentiates with respect to params, "
            "inner_lr, step_weights and wrt only, but a tensor of `tasks` requires grad. "
            "Detach the tasks, or differentiate fmaml.meta_loss."
        )
    names = select(params.keys(), inner.adapt_keys)
    if strategy.checkpoint and inner.head_init is not None and inner.num_steps > 0:
        if not set(HEAD_KEYS) <= set(names):
            raise ValueError(
                f"value_and_grad(): strategy '{strategy}' recomputes the prototype head "
                "inside the first inner step, so with head_init='prototypes' it needs the head "
                f"adapted, but `adapt_keys` leaves out {sorted(set(HEAD_KEYS) - set(names))}. "
                "Use checkpoint=False."
            )
    if strategy.compile:
        if is_padded(tasks.support) or is_padded(tasks.query):
            raise ValueError(
                "value_and_grad(): Strategy(compile=True) is not tested with padded tasks (a "
                "mask), so it is refused. Use compile=False."
            )
        refuse_batchnorm(loss_fn)


def refuse_batchnorm(loss_fn) -> None:
    """Raise ``ValueError`` if the loss's ``module`` has BatchNorm (for ``compile=True``)."""
    if has_batchnorm(getattr(loss_fn, "module", None)):
        raise ValueError(
            "Strategy(compile=True) refuses models with BatchNorm: an earlier form of fmaml's "
            "BatchNorm compiled to wrong second-order gradients, and the current one breaks the "
            "compiled graph, so nothing would be gained (benchmarks/README.md). Use "
            "compile=False for this model."
        )


# --- torch's thread count -----------------------------------------------------------------------

_THREADS = threading.RLock()


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """torch's intra-op thread count set to ``threads`` in this scope, then set back.

    The count is process-wide (``torch.set_num_threads``), so scopes of different threads
    take turns (one might otherwise restore the other's value); scopes nest within a thread.
    ``None`` changes nothing and takes no turn."""
    if threads is None:
        yield
        return
    with _THREADS:
        before = torch.get_num_threads()
        if threads != before:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
