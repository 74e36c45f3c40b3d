"""How :func:`fmaml.meta_loss` runs a meta-batch: execution strategies.

A :class:`Strategy` decides how the tasks of a meta-batch are computed, never what is
computed: every strategy gives the same loss and the same meta-gradient (tested in float64 in
``tests/test_strategy.py``). The choices are

- ``chunk_size``: how many tasks are vmapped together. ``None`` vmaps the whole meta-batch
  at once (the default of :func:`fmaml.meta_loss`); ``k`` vmaps ``k`` tasks at a time and
  accumulates their gradients, so only one chunk's graph is alive at a time; ``1`` runs the
  tasks one by one without ``vmap``, where BatchNorm and convolution use torch's plain
  kernels (the fastest way on a CPU: vmap turns a convolution with per-task weights into a
  grouped convolution, which is slow there).
- ``checkpoint``: keep only each inner step's parameters and recompute the step (its support
  forward and backward) in the backward pass: the memory of one inner step instead of all
  of them, for one more support pass per step.
- ``workers``: chunks computed by that many CPU threads at once, each with its share of
  torch's intra-op threads (and its own copy of the model), instead of splitting each small
  op across the threads; it also keeps OpenMP's spinning barriers out of a busy machine.
- ``channels_last``: with ``chunk_size=1``, give the network each task's query images in
  the channels-last memory format (CPU convolution, BatchNorm and max-pool kernels are
  faster on it; the values are the same). :func:`auto_strategy` turns it on for large tasks
  on a CPU (mini-ImageNet, one task at a time on 2 threads: 2.58 -> 2.23 s a meta-step).
- ``compile``: compile the whole meta-step (the vmapped inner loop, the query losses and the
  meta-gradient) with ``torch.compile`` (one vmap over all tasks). The first meta-batch pays
  the compilation (20-90 s on a CPU), later ones run about 2x faster on an MLP; a new
  shape or setting compiles again. Refused for models with BatchNorm: an earlier form of
  fmaml's BatchNorm compiled to wrong second-order gradients, and the current one breaks the
  compiled graph (its vmap check is a call dynamo cannot trace), so nothing is gained
  (``benchmarks/README.md``).
- ``threads``: torch's intra-op threads while the meta-batch runs. The ops of a small
  network are too small to split; under vmap some are just large enough to enter OpenMP
  regions, and if another process holds a core, their spinning barriers make a meta-step up
  to 100x slower.

:func:`auto_strategy` picks one per device; :func:`fmaml.meta_loss` takes any through its
``strategy`` argument. What the loss a strategy returns can be differentiated with respect
to, and what is refused, is in :class:`Strategy`'s docstring. A strategy sets torch's thread
count only while the meta-batch runs (and only if it changes it), and touches neither the
warning filters nor the random state beyond that scope. Threads may call :func:`fmaml.meta_loss`
at once: meta-batches that set the thread count (and compiled ones, which filter a warning)
take turns, since both are process-wide; the others run side by side
(``tests/test_threads.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fmaml.adapt import PLAIN_AUTOGRAD, STAND_INS, at_step, inner_step, step_rates, support_loss
from fmaml.graph import depends_on, reached_leaves
from fmaml.inner_loop import UNSET, InnerLoop, InnerLR, StepWeights, settings
from fmaml.inner_optim import InnerOptimizer, check_inner_optimizer
from fmaml.module import SupervisedLoss
from fmaml.nn.batchnorm import BatchNorm
from fmaml.objectives import check_step_weights, check_tasks, meta_loss, over_tasks, task_loss
from fmaml.proto import HEAD_KEYS, prototype_head
from fmaml.tree import KeySelector, select, tensors_in
from fmaml.types import LossFn, Task


@dataclass(frozen=True)
class Strategy:
    """How :func:`fmaml.meta_loss` computes a meta-batch; the result does not depend on it.

    Args:
        chunk_size: tasks vmapped together; ``None``: all of them; ``1``: one at a time,
            without ``vmap``.
        checkpoint: recompute each inner step in the backward instead of storing it.
        workers: CPU threads working on different chunks at once (1: none besides the
            caller); each gets ``threads // workers`` intra-op threads while they run.
        channels_last: one task at a time, query images ``[n, C, H, W]`` in channels-last
            layout (needs ``chunk_size=1``).
        threads: torch's intra-op threads while the meta-batch runs (shared by the
            ``workers``); ``None``: as set (``torch.get_num_threads()``).
        compile: compile the meta-step with ``torch.compile`` (needs ``chunk_size=None``,
            one worker, no ``checkpoint``; not for models with BatchNorm).

    Any setting other than the default ``Strategy()`` computes the meta-gradient while
    :func:`fmaml.meta_loss` runs, chunk by chunk, and returns a loss whose backward hands it
    out. It is exact or refused (tested in float64 against ``strategy=None`` in
    ``tests/test_strategy.py``):

    - Exact for every tensor requiring grad the meta-loss depends on: ``params``, the
      tensors of ``inner_lr`` and of ``step_weights`` (one tensor, or a list of 0-d tensors
      and numbers), the hyper-parameter tensors of ``inner_optimizer`` (learned betas), and
      the tensors a ``loss_fn`` captures (a learned temperature in the criterion). Each
      chunk's graph is walked to the leaves requiring grad it reaches besides those
      arguments (``fmaml.graph.reached_leaves``, about a millisecond per thousand graph
      nodes), and their gradients are accumulated with the others, through the inner loop
      too. A captured non-leaf computed outside the loss
      (``temp = log_temp.exp()``) passes its gradient on to its leaves (``log_temp``); the
      returned loss's graph goes to those leaves, not through the non-leaf, so ask for the
      leaves' gradients (``backward()`` fills their ``.grad``). Exact rather than refused
      because the walk is cheap and the gradient is the pure path's, chunk by chunk.
    - Refused with ``ValueError``: a tensor handed a gradient that is computed from another
      one handed a gradient (``inner_lr=log_lr.exp()`` while the loss captures ``log_lr``):
      each gets its total gradient, so the one upstream would count the other's twice.
      Also refused: ``tasks`` that require grad, and running inside ``torch.func``
      transforms.
    - ``inner_optimizer`` (:mod:`fmaml.inner_optim`): ``checkpoint`` keeps each step's
      optimiser state (momentum, Adam's moments) with its parameters and pulls the adjoint
      back through both; the state must hold tensors only (else ``ValueError``).
    - ``objective="reptile"`` (:func:`fmaml.reptile_loss`): its gradient goes through no
      inner step, so ``checkpoint`` has nothing to recompute and runs each chunk as without
      it (no inner step's graph is kept either way); the other fields apply as they are.
    - ``head_init="prototypes"`` (ProtoMAML): exact on every path; ``checkpoint``
      recomputes the prototype head with the first inner step (so it needs the head among
      the adapted keys, else refused), and with ``num_steps=0`` (ProtoNet) has nothing to
      recompute and runs each chunk as without it.
    - ``objective=fmaml.IMAML(...)`` (:func:`fmaml.imaml_loss`): likewise no inner step is
      differentiated (the implicit gradient is solved per task by conjugate gradient), so
      ``checkpoint`` runs each chunk as without it; the other fields apply as they are.
    - Differentiable once: the handed-out gradients carry no graph, so a backward with
      ``create_graph=True`` (a Hessian-vector product, a second derivative) raises
      ``RuntimeError``. :func:`fmaml.meta_loss` with ``strategy=None`` is differentiable any
      number of times.

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

    @property
    def is_plain(self) -> bool:
        """Whether this is the default: one vmap over every task, autograd's own backward."""
        return self == Strategy()

    def run(
        self,
        loss_fn: LossFn,
        params: Mapping[str, Tensor],
        tasks: Task,
        inner: InnerLoop,
        *,
        score_fn: LossFn | None = None,
        objective: object = "query",
    ):
        """:func:`fmaml.meta_loss` of ``tasks`` with the inner loop ``inner``, computed this
        way (``meta_loss(..., strategy=self)`` calls it)."""
        return run_strategy(
            self, loss_fn, params, tasks, inner, score_fn=score_fn, objective=objective
        )

    def __str__(self) -> str:
        if self.chunk_size is None:
            text = "vmap over all tasks"
        elif self.chunk_size == 1:
            text = "one task at a time"
        else:
            text = f"vmap over chunks of {self.chunk_size} tasks"
        if self.checkpoint:
            text += ", inner steps recomputed"
        if self.workers > 1:
            text += f", {self.workers} workers"
        if self.channels_last:
            text += ", channels-last"
        if self.compile:
            text += ", compiled"
        if self.threads is not None:
            text += f", {self.threads} intra-op thread{'s' if self.threads > 1 else ''}"
        return text


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

    On CUDA: one vmap over all tasks (large batched kernels, few launches). On a CPU, for a
    model with convolutions:

    - tasks of up to :data:`SMALL_TASK` examples (support + query; Omniglot 5-way 1-shot
      with 1 query per class has 10): one worker thread per core the meta-batch may use
      (torch's intra-op thread count, ``torch.get_num_threads()``, at most the cores this
      process may run on, :func:`available_cores`, and at most ``num_tasks``), each vmapping
      its share of the tasks at once (chunks of ``ceil(num_tasks / workers)``) on one
      intra-op thread: ops on one task's few images are too small to split across threads,
      batched they are not;
    - larger tasks, or sizes not given: one task at a time without ``vmap`` (plain
      convolution and BatchNorm kernels instead of grouped convolutions, which are slow on a
      CPU), each op on all of torch's intra-op threads, query images in channels-last (the
      CPU's convolution and max-pool kernels are faster on it). Each op has enough work to
      split, and only one task's graph is alive at a time: worker threads would hold one
      graph per worker (mini-ImageNet, 2 cores: 1.24x faster at 1.3x the peak memory; pass
      ``workers=`` for that).

    On a CPU for any other model (an MLP): one vmap over all tasks on one intra-op thread.
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


class MetaGradients(NamedTuple):
    """What :func:`value_and_grad` differentiates, each gradient in its input's place.

    A number, or a tensor that does not require grad, has ``None`` in its place.
    """

    params: dict[str, Tensor | None]
    inner_lr: object
    step_weights: object
    wrt: list[Tensor | None]


def value_and_grad(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    tasks: Task,
    inner: InnerLoop | None = None,
    *,
    inner_lr: InnerLR = UNSET,
    num_steps: int = UNSET,
    adapt_keys: KeySelector = UNSET,
    first_order: bool = UNSET,
    step_weights: StepWeights = UNSET,
    head_init: str | None = UNSET,
    inner_optimizer=UNSET,
    wrt: Sequence[Tensor] = (),
    strategy: Strategy | None = None,
    score_fn: LossFn | None = None,
    objective: object = "query",
) -> tuple[Tensor, MetaGradients] | tuple[Tensor, MetaGradients, Tensor]:
    r"""The meta-loss of :func:`fmaml.meta_loss` and its meta-gradients, the fast way.

    In the spirit of ``jax.value_and_grad``: returns the value (detached: it is not a
    graph to differentiate again) and the gradients of exactly the inputs given: ``params``,
    the tensors in ``inner_lr`` (Meta-SGD, LSLR) and ``step_weights`` that require grad, and
    the tensors in ``wrt`` (tensors the loss captures, e.g. a learned temperature). The
    meta-batch runs with ``strategy``, by default the one :func:`auto_strategy` picks for the
    device, the model and the cores (on a CPU one task at a time, or chunks of small tasks
    on worker threads; one vmap on a GPU), gradients accumulated chunk by chunk; every
    strategy gives the same values and gradients (``tests/test_value_and_grad.py``,
    float64). For a second derivative, differentiate
    :func:`fmaml.meta_loss` itself (``strategy=None``): it is the pure definition.

    Args:
        loss_fn, params, tasks, score_fn, objective: as in :func:`fmaml.meta_loss`.
        inner: the inner loop as one :class:`fmaml.InnerLoop`, or, instead, its fields as
            the keywords ``inner_lr``, ``num_steps``, ``adapt_keys``, ``first_order``,
            ``step_weights``, ``head_init``, ``inner_optimizer`` (as in
            :func:`fmaml.meta_loss`).
        wrt: more tensors to differentiate: leaves, or tensors computed from leaves.
        strategy: how to run the meta-batch; ``None``: :func:`auto_strategy`'s choice.

    Returns:
        ``(loss, grads)``, and the mean score too when ``score_fn`` is given: ``loss`` a
        detached 0-d tensor, ``grads`` a :class:`MetaGradients`.

    Raises:
        ValueError: everything :func:`fmaml.meta_loss` raises.

    Example:
        >>> import torch, torch.nn.functional as F, fmaml
        >>> model = fmaml.nn.mlp()
        >>> params = fmaml.params_of(model)
        >>> loss_fn = fmaml.supervised_loss(model, F.mse_loss)
        >>> g = torch.Generator().manual_seed(0)
        >>> tasks = fmaml.tasks.SinusoidTasks(num_shots=5).sample(4, g)
        >>> loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner_lr=0.01)
        >>> loss.requires_grad, grads.params["head.weight"].shape
        (False, torch.Size([1, 40]))
    """
    inner = settings(
        inner,
        "value_and_grad",
        inner_lr=inner_lr,
        num_steps=num_steps,
        adapt_keys=adapt_keys,
        first_order=first_order,
        step_weights=step_weights,
        head_init=head_init,
        inner_optimizer=inner_optimizer,
    )
    if strategy is None:
        x_support, x_query = tasks.support[0], tasks.query[0]
        strategy = auto_strategy(
            x_support.device,
            loss_fn,
            num_tasks=check_tasks(tasks),
            examples_per_task=x_support.shape[1] + x_query.shape[1],
        )
    out = meta_loss(
        loss_fn, params, tasks, inner, score_fn=score_fn, strategy=strategy, objective=objective
    )
    loss, score = (out, None) if score_fn is None else out
    structure = (dict(params), inner.inner_lr, inner.step_weights, list(wrt))
    leaves, spec = tree_flatten(structure)
    live = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad]
    found = torch.autograd.grad(loss, [leaves[i] for i in live], allow_unused=True)
    grads: list = [None] * len(leaves)
    for i, g in zip(live, found, strict=True):
        grads[i] = torch.zeros_like(leaves[i]) if g is None else g
    meta = MetaGradients(*tree_unflatten(grads, spec))
    loss = loss.detach()
    return (loss, meta) if score is None else (loss, meta, score)


def available_cores() -> int:
    """The CPU cores this process may run on: its CPU affinity where the OS reports one
    (Linux), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on this OS
        return os.cpu_count() or 1


def run_strategy(
    strategy: Strategy,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    tasks: Task,
    inner: InnerLoop,
    *,
    score_fn: LossFn | None = None,
    objective: object = "query",  # "query", "reptile" or an fmaml.IMAML
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`fmaml.meta_loss` under a non-default ``strategy``; same arguments and result."""
    inner_lr, num_steps, step_weights = inner.inner_lr, inner.num_steps, inner.step_weights
    head_init, inner_optimizer = inner.head_init, inner.inner_optimizer
    num_tasks = check_tasks(tasks)
    check_inner_optimizer(inner_optimizer, "meta_loss")
    hyper = None if inner_optimizer is None else dict(inner_optimizer.hyper)
    weights = check_step_weights(step_weights, num_steps)
    names = select(params.keys(), inner.adapt_keys, caller="meta_loss")
    rates = step_rates(inner_lr, params, names, num_steps, caller="meta_loss")
    _refuse_transforms()
    if strategy.checkpoint and head_init is not None and num_steps > 0:
        if not set(HEAD_KEYS) <= set(names):
            raise ValueError(
                f"meta_loss(): strategy '{strategy}' recomputes the prototype head inside "
                "the first inner step, so with head_init='prototypes' it needs the head "
                "adapted, but `adapt_keys` leaves out "
                f"{sorted(set(HEAD_KEYS) - set(names))}. Use checkpoint=False, or "
                "strategy=None."
            )
    if any(t.requires_grad for pair in tasks for t in pair):
        raise ValueError(
            f"meta_loss(): strategy {strategy} differentiates with respect to params, "
            "inner_lr and step_weights only, but a tensor of `tasks` requires grad. Detach "
            "the tasks, or use strategy=None."
        )
    inputs = _differentiable_inputs(params, inner_lr, step_weights, hyper)
    labels = {
        **{
            id(t): f"the inner optimiser's hyper-parameter {k!r}"
            for k, t in (hyper or {}).items()
            if isinstance(t, Tensor)
        },
        **{id(t): "a tensor of `step_weights`" for t in tensors_in(step_weights)},
        **{id(t): "a tensor of `inner_lr`" for t in tensors_in(inner_lr)},
        **{id(t): f"params[{k!r}]" for k, t in params.items()},
    }
    # With grad enabled the chunks are differentiated even if nothing passed in requires
    # grad: a tensor the loss captures may.
    want_grad = torch.is_grad_enabled()
    if strategy.compile and want_grad and inputs:
        import torch._functorch.config as functorch_config

        step = _compiled_step(loss_fn, score_fn, inner, objective)
        with (
            _intra_op_threads(strategy.threads),
            _COMPILED_CALL,
            warnings.catch_warnings(),
            # the step differentiates with retain_graph=True when the loss captures a tensor
            # (its graph outside the step must outlive it), which compiled backward functions
            # with donated buffers refuse; depending on what this process compiled before,
            # AOTAutograd may donate (a test failed only after other compiled tests)
            functorch_config.patch(donated_buffer=False),
        ):
            # dynamo reads `.grad` of every tensor it wraps, non-leaves too, and torch
            # warns about that; it is dynamo's own access, not the user's
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor")
            value, grads, captured, score = step(
                dict(params), inner_lr, step_weights, tasks, inputs, hyper
            )
        captured = {id(t): (t, g) for t, g in zip(captured, grads[len(inputs) :], strict=True)}
        value = _hand_out(value, grads[: len(inputs)], captured, strategy, labels, inputs)
        return value if score_fn is None else (value, score)
    size = num_tasks if strategy.chunk_size is None else min(strategy.chunk_size, num_tasks)
    job = _Job(
        loss_fn=loss_fn,
        params=dict(params),
        inner=inner,
        names=names,
        rates=rates,
        weights=weights,
        score_fn=score_fn,
        num_tasks=num_tasks,
        inputs=inputs,
        want_grad=want_grad,
        unbatched=strategy.chunk_size == 1,
        checkpoint=strategy.checkpoint,
        objective=objective,
    )
    chunks = [
        _slice(tasks, start, min(start + size, num_tasks), job.unbatched, strategy.channels_last)
        for start in range(0, num_tasks, size)
    ]
    with _intra_op_threads(strategy.threads):
        value, grads, captured, scores = _run_chunks(job, chunks, strategy.workers)
    if want_grad:
        value = _hand_out(value, grads, captured, strategy, labels, inputs)
    return value if score_fn is None else (value, scores / num_tasks)


def _hand_out(value, grads, captured, strategy, labels, inputs) -> Tensor:
    """The loss whose backward hands out ``grads`` to ``inputs`` and each captured tensor
    its gradient; refused if one of them is computed from another (counted twice)."""
    extra = [t for t, _ in captured.values()]
    _refuse_entangled([*inputs, *extra], strategy, labels)
    everything = [*inputs, *extra]
    if not everything:
        return value
    handed = (*grads, *(g for _, g in captured.values()))
    return _Precomputed.apply(value, handed, str(strategy), *everything)


# --- compiled ---------------------------------------------------------------------------------

_COMPILED: dict[tuple, tuple] = {}


def _compiled_step(loss_fn, score_fn, inner: InnerLoop, objective) -> Callable:
    """``(params, inner_lr, step_weights, tasks, inputs, hyper) -> (loss, grads, captured,
    score)`` compiled (``grads`` for ``inputs`` and then for the ``captured`` leaves),
    made once per loss and setting, so that later calls hit torch.compile's cache. Kept for
    the life of the process (as torch.compile keeps its compiled code). The inner
    optimiser's hyper-parameters come in as ``hyper``: a learned one is a new tensor every
    step (``sigmoid(logit)``), so only its functions are part of the setting."""
    num_steps, first_order, adapt_keys = inner.num_steps, inner.first_order, inner.adapt_keys
    head_init, inner_optimizer = inner.head_init, inner.inner_optimizer
    kind = None if inner_optimizer is None else (inner_optimizer.init, inner_optimizer.update)
    key = (
        id(loss_fn),
        id(score_fn),
        num_steps,
        first_order,
        id(adapt_keys),
        objective,
        head_init,
        kind,
    )
    if key not in _COMPILED:
        refuse_batchnorm(loss_fn, score_fn)  # once per loss and setting, not every step
        captured_by = torch._dynamo.disable(_captured_by)  # imports dynamo: only here

        def step(params, inner_lr, step_weights, tasks, inputs, hyper):
            out = meta_loss(
                loss_fn,
                params,
                tasks,
                inner_lr=inner_lr,
                num_steps=num_steps,
                adapt_keys=adapt_keys,
                first_order=first_order,
                step_weights=step_weights,
                score_fn=score_fn,
                objective=objective,
                head_init=head_init,
                inner_optimizer=None if kind is None else InnerOptimizer(*kind, hyper),
            )
            loss, score = (out, None) if score_fn is None else out
            captured = captured_by(loss, inputs)
            grads = torch.autograd.grad(
                loss, [*inputs, *captured], allow_unused=True, retain_graph=bool(captured)
            )
            return loss.detach(), grads, captured, None if score is None else score.detach()

        _COMPILED[key] = (torch.compile(step), loss_fn, score_fn, adapt_keys)  # ids stay valid
    return _COMPILED[key][0]


def refuse_batchnorm(*losses) -> None:
    """Raise ``ValueError`` if a loss's ``module`` has BatchNorm (for ``compile=True``)."""
    for fn in losses:
        module = getattr(fn, "module", None)
        if isinstance(module, torch.nn.Module) and any(
            isinstance(m, (BatchNorm, torch.nn.modules.batchnorm._BatchNorm))
            for m in module.modules()
        ):
            raise ValueError(
                "Strategy(compile=True) refuses models with BatchNorm: an earlier form of "
                "fmaml's BatchNorm compiled to wrong second-order gradients, and the current "
                "one breaks the compiled graph, so nothing would be gained "
                "(benchmarks/README.md). Use compile=False for this model."
            )


# --- one chunk ----------------------------------------------------------------------------------


@dataclass
class _Job:
    loss_fn: LossFn
    params: dict
    inner: InnerLoop
    names: list  # the adapted names, rates per step and checked step weights of `inner`
    rates: list
    weights: object
    score_fn: LossFn | None
    num_tasks: int
    inputs: list
    want_grad: bool
    unbatched: bool
    checkpoint: bool
    objective: object = "query"  # "query", "reptile" or an fmaml.IMAML

    def on_own_module(self) -> _Job:
        """This job with losses whose modules are private copies (for another thread)."""
        copies = {}
        for name in ("loss_fn", "score_fn"):
            fn = getattr(self, name)
            if fn is None:
                continue
            if not isinstance(fn, SupervisedLoss):
                raise ValueError(
                    "meta_loss(): Strategy(workers > 1) needs losses from "
                    f"fmaml.supervised_loss (it gives each thread its own copy of the model); "
                    f"got `{name}` of type {type(fn).__name__}. Use workers=1."
                )
            # a private module, but the same tensors: one that requires grad (a module
            # attribute the loss uses) must get its gradient, not a copy of it
            copies[name] = fn.on_private_module()
        return dataclasses.replace(self, **copies)

    def run(self, chunk: Task) -> tuple[Tensor, list, dict, Tensor | None]:
        """(this chunk's share of the loss, its gradients for ``inputs``, ``{id: (tensor,
        gradient)}`` for the leaves requiring grad it reaches besides them (tensors the loss
        captures), its summed score)."""
        if self.checkpoint and self.objective == "query" and self.inner.num_steps > 0:
            # Reptile's and iMAML's gradients go through no inner step (the adapted
            # parameters are constants of them): there is nothing to recompute, and the
            # plain path already keeps no inner step's graph; nor is there without inner
            # steps (ProtoNet).
            return self._run_checkpointed(chunk)
        token = PLAIN_AUTOGRAD.set(self.unbatched)  # no transform is active: plain autograd
        stand_ins = STAND_INS.set([])
        try:
            with torch.enable_grad() if self.want_grad else torch.no_grad():
                out = self._over(self._task_loss, chunk)
            loss, score = (out, None) if self.score_fn is None else out
            loss = loss.sum() / self.num_tasks
            grads, captured = self._grad(loss, self.inputs)
        finally:
            STAND_INS.reset(stand_ins)
            PLAIN_AUTOGRAD.reset(token)
        return loss.detach(), grads, captured, None if score is None else score.sum()

    def _task_loss(self, task: Task):
        return task_loss(
            self.loss_fn,
            self.params,
            task,
            self.inner,
            score_fn=self.score_fn,
            objective=self.objective,
        )

    def _over(self, per_task: Callable, chunk: Task, fast=None, batched: bool = False):
        """``per_task`` on every task of the chunk; ``fast`` per-task (batched) or shared."""
        if fast is None:
            return per_task(chunk) if self.unbatched else over_tasks(per_task, chunk)
        if self.unbatched:
            return per_task(fast, chunk)
        return torch.func.vmap(per_task, in_dims=(0 if batched else None, 0))(fast, chunk)

    def _grad(self, output, wrt, grad_outputs=None) -> tuple[list, dict]:
        """The gradients of ``output`` for ``wrt``, and ``{id: (tensor, gradient)}`` for every
        other tensor requiring grad that its graph reaches: one of ``inputs`` (the
        checkpointed path differentiates each piece for some of them) or a leaf the loss
        captures. The walk that finds them stops at ``wrt`` and ``inputs``."""
        result: list = [None] * len(wrt)
        if not self.want_grad:
            return result, {}
        if isinstance(output, Tensor):
            output, grad_outputs = [output], None
        pairs = [
            (o, g)
            for o, g in zip(output, grad_outputs or [None] * len(output), strict=True)
            if o.requires_grad and (grad_outputs is None or g is not None)
        ]
        if not pairs:
            return result, {}
        outputs = [o for o, _ in pairs]
        captured, reached = reached_leaves(
            outputs, stop=[*wrt, *self.inputs], skip=STAND_INS.get() or ()
        )
        named = {id(t) for t in wrt}
        others = [t for t in reached if id(t) not in named] + captured
        live = [i for i, t in enumerate(wrt) if t.requires_grad]
        if not live and not others:
            return result, {}
        grads = torch.autograd.grad(
            outputs,
            [*(wrt[i] for i in live), *others],
            grad_outputs=None if grad_outputs is None else [g for _, g in pairs],
            allow_unused=True,
            # the graph of a captured non-leaf (``temp = log_temp.exp()``) is shared by every
            # chunk, so it must outlive this backward
            retain_graph=bool(captured),
        )
        for i, g in zip(live, grads[: len(live)], strict=True):
            result[i] = g
        extra = {
            id(t): (t, g) for t, g in zip(others, grads[len(live) :], strict=True) if g is not None
        }
        return result, extra

    # --- checkpointed: each inner step recomputed in the backward ---------------------------

    def _frozen(self) -> dict:
        return {k: v for k, v in self.params.items() if k not in set(self.names)}

    def _step(self, s: int):
        """Inner step ``s`` of one task, ``((fast, state), task) -> (fast, state)``, through
        :func:`fmaml.adapt.inner_step` (the step :func:`fmaml.unroll` takes). ``state`` is
        the inner optimiser's: ``None`` before the first step, ``{}`` for plain SGD (vmap
        carries no ``None``)."""
        frozen, rate, first_order = self._frozen(), self.rates[s], self.inner.first_order
        head_init = self.inner.head_init if s == 0 else None
        inner_optimizer = self.inner.inner_optimizer

        def step(carry: tuple, task: Task) -> tuple:
            fast, state = carry
            if head_init is not None:
                # ProtoMAML: the head starts from this task's prototypes; recomputed with the
                # first step in the backward, so the meta-gradient flows through it too
                start = prototype_head(self.loss_fn, {**frozen, **fast}, task.support)
                fast = {k: start[k] for k in fast}
            grads = torch.func.grad(support_loss)(
                fast, at_step(self.loss_fn, s), frozen, task.support
            )
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            fast, state = inner_step(grads, state or None, fast, rate, inner_optimizer)
            state = {} if state is None else state
            kinds = {type(t).__name__ for t in tree_flatten(state)[0] if not isinstance(t, Tensor)}
            if kinds:
                raise ValueError(
                    "meta_loss(): Strategy(checkpoint=True) keeps the inner optimiser's state "
                    "between steps and vmaps it, so it must hold tensors only, but it holds "
                    f"{sorted(kinds)}. Keep a step counter as a 0-d tensor (as "
                    "fmaml.inner_optim.adam does), or use checkpoint=False."
                )
            return fast, state

        return step

    def _query(self, s: int, fn: LossFn):
        frozen = self._frozen()

        def query(fast: dict, task: Task) -> Tensor:
            return at_step(fn, s, task.support)({**frozen, **fast}, task.query)

        return query

    def _weight(self, s: int):
        """The weight of the query loss after ``s`` inner steps (``None``: not scored)."""
        if self.weights is None:
            return 1.0 if s == self.inner.num_steps else None
        w = self.weights[s - 1]
        if isinstance(w, numbers.Real) and w == 0:
            return None
        return w

    def _run_checkpointed(self, chunk: Task):
        names, steps = self.names, self.inner.num_steps
        frozen = self._frozen()
        index = {id(t): i for i, t in enumerate(self.inputs)}
        total: list = [None] * len(self.inputs)
        captured: dict = {}

        def add(tensors, grads, extra=None):
            for t, g in zip(tensors, grads, strict=True):
                if g is not None and id(t) in index:
                    i = index[id(t)]
                    total[i] = g if total[i] is None else total[i] + g
            for key, (t, g) in (extra or {}).items():
                if key in index:
                    add([t], [g])
                else:
                    captured[key] = (t, g if key not in captured else captured[key][1] + g)

        # Forward: every inner step without a graph; keep each step's adapted parameters
        # and inner-optimiser state (momentum, Adam's moments; {} for plain SGD).
        fasts, states = [{k: self.params[k] for k in names}], [None]
        with torch.no_grad():
            for s in range(steps):
                fast, state = self._over(self._step(s), chunk, (fasts[s], states[s]), s > 0)
                fasts.append(fast)
                states.append(state)
        # The query losses, each differentiated at once with respect to its step's params.
        value = None
        query_grads: dict[int, dict] = {}
        frozen_live = list(frozen.values())
        for s in range(1, steps + 1):
            w = self._weight(s)
            if w is None:
                continue
            leaf = {k: v.detach().requires_grad_(self.want_grad) for k, v in fasts[s].items()}
            with torch.enable_grad() if self.want_grad else torch.no_grad():
                losses = self._over(self._query(s, self.loss_fn), chunk, leaf, batched=True)
                share = (losses * w).sum() / self.num_tasks
            # the weights: one tensor (each share reaches all of it) or this step's entry
            weight = self.weights if isinstance(self.weights, Tensor) else w
            extra = [weight] if isinstance(weight, Tensor) else []
            wrt = [*leaf.values(), *frozen_live, *extra]
            grads, others = self._grad(share, wrt)
            query_grads[s] = dict(zip(names, grads[: len(names)], strict=True))
            add(wrt[len(names) :], grads[len(names) :], others)
            value = share.detach() if value is None else value + share.detach()
        score = None
        if self.score_fn is not None:
            with torch.no_grad():
                score = self._over(
                    self._query(steps, self.score_fn), chunk, fasts[steps], batched=steps > 0
                ).sum()
        if not self.want_grad:
            return value, total, captured, score
        # Backward: recompute each step with a graph, pull the adjoint back through it. The
        # adjoint is the parameters' and the optimiser state's (each state tensor's, in
        # tree_flatten's order); the last state feeds no loss.
        optimizer = self.inner.inner_optimizer
        hyper = tensors_in(None if optimizer is None else optimizer.hyper)
        adjoint = query_grads.get(steps, dict.fromkeys(names))
        state_adjoint: list = []
        for s in reversed(range(steps)):
            if s == 0:
                start, state = {k: self.params[k] for k in names}, None
            else:
                start = {k: v.detach().requires_grad_() for k, v in fasts[s].items()}
                state = tree_map(lambda t: t.detach().requires_grad_(), states[s])
            state_leaves = [] if state is None else tree_flatten(state)[0]
            with torch.enable_grad():
                after, after_state = self._over(self._step(s), chunk, (start, state), s > 0)
            after_leaves = tree_flatten(after_state)[0]
            n, m = len(names), len(state_leaves)
            wrt = [*start.values(), *state_leaves, *frozen_live, *tensors_in(self.rates[s])]
            wrt += [t for t in hyper if all(t is not w for w in wrt)]
            grads, others = self._grad(
                [*(after[k] for k in names), *after_leaves],
                wrt,
                [*(adjoint[k] for k in names), *(state_adjoint or [None] * len(after_leaves))],
            )
            if s == 0:
                add(wrt, grads, others)
            else:
                add(wrt[n + m :], grads[n + m :], others)
                below = query_grads.get(s, {})
                adjoint = {
                    k: _sum_or_none([g, below.get(k)])
                    for k, g in zip(names, grads[:n], strict=True)
                }
                state_adjoint = grads[n : n + m]
        return value, total, captured, score


# --- helpers ------------------------------------------------------------------------------------


class _Precomputed(torch.autograd.Function):
    """The loss value, with a backward that hands out gradients computed beforehand.

    Differentiable once: the gradients carry no graph, so a backward that would build one
    (``create_graph=True``, for a second derivative) raises instead of giving a wrong or
    missing value."""

    @staticmethod
    def forward(ctx, value, grads, strategy, *inputs):
        ctx.grads, ctx.strategy = grads, strategy
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"meta_loss(): the loss computed under strategy '{ctx.strategy}' is "
                "differentiable once: its backward hands out gradients computed while it ran, "
                "which carry no graph, so it can't be differentiated with create_graph=True "
                "(a second derivative, e.g. a Hessian-vector product). Use strategy=None "
                "(one vmap over all tasks, differentiable any number of times) for higher "
                "derivatives."
            )
        return (None, None, None, *(None if g is None else g * grad_output for g in ctx.grads))


def _run_chunks(job: _Job, chunks: list, workers: int) -> tuple:
    """Every chunk's (loss share, gradients, summed score), summed as they come (only one
    chunk's gradients alive besides the totals). With ``workers`` threads, each runs its own
    chunks on its own copy of the model (``functional_call`` swaps a module's tensors while
    it runs, so threads can't share one), with its share of torch's intra-op threads."""
    workers = min(workers, len(chunks))
    if workers <= 1:
        return _accumulate(job.run(c) for c in chunks)
    copies = [job] + [job.on_own_module() for _ in range(workers - 1)]
    with _intra_op_threads(max(1, torch.get_num_threads() // workers)):
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(
                pool.map(
                    lambda w: _accumulate(copies[w].run(c) for c in chunks[w::workers]),
                    range(workers),
                )
            )
    return _accumulate(parts)


def _accumulate(results) -> tuple:
    """Sum (value, gradients, captured gradients, score) over chunks."""
    value, grads, captured, score = None, None, {}, None
    for v, g, c, sc in results:
        value = v if value is None else value + v
        score = sc if score is None else (score if sc is None else score + sc)
        grads = (
            list(g)
            if grads is None
            else [_sum_or_none([a, b]) for a, b in zip(grads, g, strict=True)]
        )
        for key, (t, grad) in c.items():
            captured[key] = (t, grad if key not in captured else captured[key][1] + grad)
    return value, grads, captured, score


class _ThreadCount:
    """Scopes that set torch's intra-op thread count, one thread's at a time.

    The count is process-wide (``torch.set_num_threads``): if two threads each set it for a
    meta-batch and set it back, one may restore the other's value and leave it for the rest
    of the process. A thread that opens a scope waits until no other thread holds one; scopes
    nest within a thread; the outermost exit restores the count found on entry. Meta-batches
    with ``Strategy(threads=None)`` don't take part (they run with the count as it is)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._owner: int | None = None
        self._depth = 0

    @contextlib.contextmanager
    def scope(self, threads: int | None):
        if threads is None:
            yield
            return
        me = threading.get_ident()
        with self._condition:
            while self._depth and self._owner != me:
                self._condition.wait()
            self._owner, self._depth = me, self._depth + 1
            before = torch.get_num_threads()
            if threads != before:
                torch.set_num_threads(threads)
        try:
            yield
        finally:
            with self._condition:
                if torch.get_num_threads() != before:
                    torch.set_num_threads(before)
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._condition.notify_all()


_THREAD_COUNT = _ThreadCount()


def _intra_op_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` in this scope, then set back (nothing
    done for ``None``); other threads' scopes wait (see :class:`_ThreadCount`)."""
    return _THREAD_COUNT.scope(threads)


_COMPILED_CALL = threading.Lock()
"""Held while a compiled meta-step runs: it filters one warning of dynamo's in a
``warnings.catch_warnings()`` scope, and the warning filters are process-wide."""


def _captured_by(loss: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """The leaves requiring grad that ``loss``'s graph reaches besides ``inputs`` (run
    outside ``torch.compile``, under ``torch._dynamo.disable``: it reads the graph)."""
    if not loss.requires_grad:
        return []
    return reached_leaves([loss], stop=inputs)[0]


def _refuse_entangled(tensors: list[Tensor], strategy: Strategy, labels: dict) -> None:
    """Raise if one of the tensors handed gradients is computed from another: the strategy
    hands each its total gradient, so the one upstream would count the other's twice."""
    for t in tensors:
        upstream = depends_on(t, tensors)
        if upstream:
            raise ValueError(
                f"meta_loss(): strategy '{strategy}' hands each tensor it differentiates its "
                f"own gradient, but {_describe(t, labels)} is computed from "
                f"{', '.join(_describe(u, labels) for u in upstream)}, which it also "
                "differentiates: that gradient would be counted twice. Pass only the tensors "
                "it is computed from (compute the rest inside loss_fn), or use strategy=None."
            )


def _describe(t: Tensor, labels: dict) -> str:
    """Which tensor this is, for error messages: its argument, or a captured leaf."""
    shape = f"shape {list(t.shape)}, {t.dtype}"
    return f"{labels.get(id(t), 'a leaf tensor the loss captures')} ({shape})"


def _slice(tasks: Task, start: int, stop: int, unbatched: bool, channels_last: bool) -> Task:
    if unbatched:

        def layout(t: Tensor) -> Tensor:
            if channels_last and t.dim() == 4 and t.is_floating_point():
                return t.contiguous(memory_format=torch.channels_last)
            return t

        support, query = tasks
        return Task(tuple(t[start] for t in support), tuple(layout(t[start]) for t in query))
    return Task(*(tuple(t[start:stop] for t in pair) for pair in tasks))


def _differentiable_inputs(params, inner_lr, step_weights, hyper=None) -> list[Tensor]:
    """The distinct tensors the meta-loss is differentiated with respect to."""
    found, seen = [], set()
    tensors = [*params.values(), *tensors_in(inner_lr), *tensors_in(step_weights)]
    for t in [*tensors, *tensors_in(hyper)]:
        if t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            found.append(t)
    return found


def _sum_or_none(values):
    present = [v for v in values if v is not None]
    if not present:
        return None
    total = present[0]
    for v in present[1:]:
        total = total + v
    return total


def _refuse_transforms() -> None:
    try:
        active = torch._C._functorch.get_interpreter_stack()
    except AttributeError:
        active = None
    if active:
        raise RuntimeError(
            "meta_loss(): a strategy other than the default computes gradients with "
            "torch.autograd and can't run inside torch.func transforms (vmap, grad, ...). "
            "Call meta_loss outside them, or use strategy=None."
        )
