"""The outer loop: the one stateful shell around the pure functions.

``train(config, out_dir)`` meta-trains, logs metrics to ``metrics.jsonl``, validates on fixed
episodes, and keeps ``latest.pt`` and (with ``config.keep_best``, the default for image data)
``best.pt`` checkpoints that hold everything needed to resume bit-for-bit on the CPU.

Under ``torch.distributed`` (``torchrun``) every rank runs the same loop on its share of each
meta-batch (see :mod:`fmaml.training.distributed`); rank 0 alone writes metrics and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fmaml.adapt import InnerLR, init_rates
from fmaml.algorithms import get_algorithm
from fmaml.engine.run import refuse_batchnorm, value_and_grad
from fmaml.engine.strategy import MemoryPlan, Strategy, auto_strategy, plan_memory
from fmaml.errors import ConfigError, NonFiniteError, WriteError
from fmaml.evaluate import evaluate, mean_ci95
from fmaml.implicit import IMAML
from fmaml.inner_loop import InnerLoop
from fmaml.inner_optim import InnerOptimizer, get_inner_optimizer, hyper_names, proximal
from fmaml.module import params_of, per_step
from fmaml.schedules import cosine_lr, first_order_at, msl_weights
from fmaml.training import distributed, peak
from fmaml.training.checkpoint import (
    BEST,
    LATEST,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fmaml.training.config import LEARNED_HYPER, TrainConfig, parse_size, resolve
from fmaml.training.distributed import RankFailure, Ranks
from fmaml.training.problems import EmptySplit, Problem, sinusoid_problem
from fmaml.tree import tree_clone
from fmaml.types import Params

VAL_SEED = 20170309
"""Validation episodes are drawn from this seed alone, so every run validates on the same tasks."""

METRICS = "metrics.jsonl"


@dataclass
class TrainState:
    """A run in progress: what a checkpoint stores, live."""

    config: TrainConfig
    problem: Problem
    params: Params
    rates: dict | list | None
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    iteration: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    adapt_keys: Any = None
    strategy: Strategy = field(default_factory=Strategy)
    # ``--learn-inner-hyper``: the logits of the inner optimiser's learned betas.
    hyper_logits: dict[str, torch.Tensor] | None = None
    # --memory-budget (or CUDA): the plan the strategy came from; not saved (made anew)
    memory_plan: MemoryPlan | None = None
    peak_growth: int | None = None  # bytes above the process at rest, measured by train()

    @property
    def inner_optimizer(self) -> InnerOptimizer | None:
        """The inner optimiser (``None``: plain SGD), its learned betas ``sigmoid(logit)``."""
        config = self.config
        if config.inner_optimizer == "sgd":
            return None
        hyper = dict(config.inner_hyper)
        for name, logit in (self.hyper_logits or {}).items():
            hyper[name] = torch.sigmoid(logit)
        return get_inner_optimizer(config.inner_optimizer, **hyper)

    @property
    def eval_inner_optimizer(self) -> InnerOptimizer | None:
        """The inner optimiser of validation and test: iMAML's proximal inner problem
        (``proximal(imaml_lam)``, the one it trains on), else :attr:`inner_optimizer`."""
        if self.config.algorithm == "imaml":
            return proximal(self.config.imaml_lam)
        return self.inner_optimizer

    @property
    def inner_lr(self) -> InnerLR:
        """The inner rate the inner loop uses: the learned rates, else the config's number."""
        return self.config.inner_lr if self.rates is None else self.rates

    def inner_lr_for(self, num_steps: int) -> InnerLR:
        """The inner rate for ``num_steps`` steps: per-step rates repeat their last step."""
        rates = self.inner_lr
        if isinstance(rates, list):
            return [rates[min(i, len(rates) - 1)] for i in range(num_steps)]
        return rates

    def inner_loop(self, epoch: int) -> InnerLoop:
        """The inner loop of a training step in ``epoch``: the run's rates, steps and adapted
        keys (without per-step BatchNorm keys, MAML++ BNWB), the algorithm's order and head,
        and MAML++'s schedules (derivative order, multi-step loss weights) at ``epoch``."""
        config = self.config
        algorithm = get_algorithm(config.algorithm)
        return InnerLoop(
            inner_lr=self.inner_lr,
            num_steps=config.inner_steps,
            adapt_keys=self.adapt_keys,
            first_order=algorithm.first_order or first_order_at(epoch, config.da_epochs),
            step_weights=msl_weights(config.inner_steps, epoch, config.msl_epochs),
            inner_optimizer=self.inner_optimizer,
            head_init=algorithm.head_init,
        )

    def eval_inner_loop(self, num_steps: int) -> InnerLoop:
        """The inner loop of validation and test with ``num_steps`` steps."""
        return InnerLoop(
            inner_lr=self.inner_lr_for(num_steps),
            num_steps=num_steps,
            adapt_keys=self.adapt_keys,
            inner_optimizer=self.eval_inner_optimizer,
            head_init=get_algorithm(self.config.algorithm).head_init,
        )

    def leaves(self) -> list[torch.Tensor]:
        """Every meta-learned tensor, in a fixed order (the optimizer's)."""
        rates = _rate_dicts(self.rates)
        hyper = list((self.hyper_logits or {}).values())
        return list(self.params.values()) + [v for r in rates for v in r.values()] + hyper


def build_problem(config: TrainConfig, *, check_train: bool = True) -> Problem:
    """The :class:`Problem` for a resolved config (see :func:`fmaml.training.config.resolve`):
    the one place that knows each dataset.

    With ``config.precision == "bf16"`` the loss and score run their model's forward pass in
    bfloat16 (:meth:`fmaml.SupervisedLoss.with_autocast`); parameters stay float32.

    Args:
        config: the run's settings.
        check_train: check now that the training split can serve the config's tasks (a new
            run fails before it starts); ``False`` for evaluation only, which may ask for
            tasks (more ways, one alphabet) that the training split can't serve.
    """
    if config.dataset == "sinusoid":
        problem = sinusoid_problem(config)
    else:
        # the data loaders, only when needed
        from fmaml.training.image_problems import image_problem

        problem = image_problem(config, check_train=check_train)
    if config.precision == "bf16":  # the losses' forward passes in bf16, under autocast
        problem = dataclasses.replace(
            problem,
            loss_fn=problem.loss_fn.with_autocast(torch.bfloat16),
            score_fn=problem.score_fn.with_autocast(torch.bfloat16),
        )
    return problem


def init_state(config: TrainConfig) -> TrainState:
    """A fresh run: model, learned rates (if the algorithm has them), Adam, task generator.

    MAML++ settings shape the parameters here: ``lslr`` gives one learned rate per tensor and
    step; ``per_step_bn`` gives the BatchNorm weights and biases one copy per step (BNWB) and
    keeps them out of the inner loop, as MAML++ does; ``bn_statistics="support"`` normalises
    each query with the statistics of its own support set at the same step (BNRS, leak-free).

    ``inner_optimizer`` other than ``"sgd"`` adapts with momentum or Adam
    (:mod:`fmaml.inner_optim`, with ``inner_hyper``); ``learn_inner_hyper`` adds a logit leaf
    per beta (``state.hyper_logits``, after the params and rates in :meth:`TrainState.leaves`).

    The meta-batch runs with :func:`fmaml.auto_strategy`'s choice for the device and model,
    with ``config.strategy``'s fields replacing its own (``state.strategy``); strategies
    change the speed and memory, not the result (beyond float rounding).
    """
    config = resolve(config)
    algorithm = get_algorithm(config.algorithm)
    problem = build_problem(config)
    params = params_of(problem.model)
    adapt_keys = algorithm.adapt_keys
    if config.bn_statistics == "support":
        problem = dataclasses.replace(
            problem,
            loss_fn=problem.loss_fn.with_support_statistics(),
            score_fn=problem.score_fn.with_support_statistics(),
        )
    if config.per_step_bn and problem.loss_fn.batchnorm_keys():
        bn_keys = problem.loss_fn.batchnorm_keys()
        loss_fn, params = per_step(problem.loss_fn, params, bn_keys, config.inner_steps)
        problem = dataclasses.replace(
            problem, loss_fn=loss_fn, score_fn=loss_fn.with_criterion(problem.score_fn.criterion)
        )
        adapt_keys = _without(adapt_keys, set(bn_keys))
    rates = None
    if config.lslr:
        rates = init_rates(
            params,
            config.inner_lr,
            adapt_keys=adapt_keys,
            per_element=False,
            num_steps=config.inner_steps,
        )
    elif algorithm.learned_rates is not None:
        rates = init_rates(
            params,
            config.inner_lr,
            adapt_keys=adapt_keys,
            per_element=algorithm.learned_rates == "element",
        )
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    examples = None if config.dataset == "sinusoid" else config.ways * (config.shots + config.query)
    chosen = auto_strategy(
        config.device, problem.loss_fn, num_tasks=config.meta_batch, examples_per_task=examples
    )
    strategy = dataclasses.replace(chosen, **config.strategy)
    if strategy.compile:
        refuse_batchnorm(problem.loss_fn)
    state = TrainState(
        config,
        problem,
        params,
        rates,
        None,  # type: ignore[arg-type]
        generator,
        adapt_keys=adapt_keys,
        strategy=strategy,
        hyper_logits=_hyper_logits(config, next(iter(params.values()))),
    )
    state.optimizer = torch.optim.Adam(state.leaves(), lr=config.outer_lr)
    budget = parse_size(config.memory_budget)
    if budget is not None or torch.device(config.device).type == "cuda":
        _plan_memory(state, budget)
    return state


def _plan_memory(state: TrainState, budget: int | None) -> None:
    """Choose the strategy by :func:`fmaml.plan_memory` on a meta-batch like the run's (drawn
    from its own generator: the run's tasks are not changed); the config's strategy fields
    still replace the plan's."""
    config = state.config
    sample = state.problem.sample(
        config.meta_batch, torch.Generator(device=config.device).manual_seed(config.seed)
    )
    options = {"objective": objective_of(config)}
    args = (state.problem.loss_fn, state.params, sample, state.inner_loop(0))
    plan = plan_memory(*args, memory_budget=budget, **options)
    if config.strategy:
        strategy = dataclasses.replace(plan.strategy, **config.strategy)
        plan = plan_memory(*args, memory_budget=budget, strategy=strategy, **options)
    state.memory_plan, state.strategy = plan, plan.strategy


def _hyper_logits(config: TrainConfig, like: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """``--learn-inner-hyper``: a logit leaf per learned beta, ``sigmoid(logit)`` = its value
    (``config.inner_hyper``'s, else the optimiser's default); ``None`` when not learned."""
    if not config.learn_inner_hyper:
        return None
    values = {**hyper_names(config.inner_optimizer), **config.inner_hyper}
    return {
        name: torch.logit(torch.tensor(float(values[name]), dtype=torch.float64))
        .to(dtype=like.dtype, device=like.device)
        .requires_grad_()
        for name in LEARNED_HYPER[config.inner_optimizer]
    }


def _stepwise_like(template, fresh):
    """``fresh`` (a loss for other shots) called the way ``template`` is (its per-step
    parameters, support statistics and autocast)."""
    return fresh.with_options(template.options)


def _without(adapt_keys, excluded: set[str]):
    """``adapt_keys`` (a predicate, names or None) minus ``excluded``, as a predicate."""
    if adapt_keys is None:
        return lambda name: name not in excluded
    if callable(adapt_keys):
        return lambda name: adapt_keys(name) and name not in excluded
    return [k for k in adapt_keys if k not in excluded]


def restore_state(path: str | Path, *, device: str | None = None) -> TrainState:
    """The :class:`TrainState` saved in a checkpoint file, ready to continue.

    Args:
        path: a checkpoint file.
        device: move the run to this device (on a device of another kind the task generator
            restarts from the seed: its state belongs to the kind of device that saved it).
    """
    return _state_from(load_checkpoint(path), device)


def _state_from(saved: dict[str, Any], device: str | None) -> TrainState:
    """The state a checkpoint's contents describe (see :func:`restore_state`)."""
    config = TrainConfig.from_dict(saved["config"])
    moved = device is not None and torch.device(device).type != torch.device(config.device).type
    if device is not None:
        config = dataclasses.replace(config, device=device)
    state = init_state(config)
    with torch.no_grad():
        for name, value in saved["params"].items():
            state.params[name].copy_(value)
        for mine, theirs in zip(_rate_dicts(state.rates), _rate_dicts(saved["rates"]), strict=True):
            for name, value in theirs.items():
                mine[name].copy_(value)
        if state.hyper_logits is not None:
            saved_logits = saved.get("hyper_logits")
            if not isinstance(saved_logits, dict) or set(saved_logits) != set(state.hyper_logits):
                raise CheckpointError(
                    "restore_state(): the checkpoint's config learns the inner optimiser's "
                    f"{sorted(state.hyper_logits)} (--learn-inner-hyper) but it holds "
                    f"{'none' if not saved_logits else sorted(saved_logits)}: it is damaged. "
                    "Use the run's other checkpoint, or train again."
                )
            for name, value in saved_logits.items():
                state.hyper_logits[name].copy_(value)
    state.optimizer.load_state_dict(saved["optimizer"])
    if not moved:
        state.generator.set_state(saved["generator"])
    state.iteration = saved["iteration"]
    state.best = saved["best"]
    return state


def state_dict(state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds: plain containers of tensors, numbers and strings."""
    return {
        "config": state.config.to_dict(),
        "iteration": state.iteration,
        "params": tree_clone(state.params),
        "rates": _detach_rates(state.rates),
        "hyper_logits": None if state.hyper_logits is None else tree_clone(state.hyper_logits),
        "optimizer": state.optimizer.state_dict(),
        "generator": state.generator.get_state(),
        "best": dict(state.best),
    }


def meta_step(state: TrainState, ranks: Ranks | None = None) -> dict[str, float]:
    """One outer step: sample a meta-batch, adapt, back-propagate, update. Returns metrics.

    Args:
        state: the run; its parameters, optimizer, generator and iteration are updated.
        ranks: split the meta-batch across these ranks (:func:`fmaml.training.distributed.current`);
            every rank must call. ``None``: all tasks here, no collectives.

    Raises:
        NonFiniteError: (a ``FloatingPointError``) the meta-loss or a meta-gradient is NaN or
            infinite; the parameters are left unchanged (the step is not taken), whatever
            ``grad_clip`` is. With ``ranks`` every rank raises.
    """
    config = state.config
    if config.cosine_annealing:
        lr = cosine_lr(state.iteration, config.iterations, config.outer_lr, config.min_outer_lr)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
    metrics = meta_gradient(state, ranks)
    if config.grad_clip is not None:  # the gradients are finite here (meta_gradient checks)
        for leaf in state.leaves():
            if leaf.grad is not None:
                leaf.grad = leaf.grad.clamp(-config.grad_clip, config.grad_clip)
    state.optimizer.step()
    state.iteration += 1
    return metrics


def objective_of(config: TrainConfig):
    """What :func:`fmaml.meta_loss` follows for the run's algorithm: ``"query"``,
    ``"reptile"``, or :class:`fmaml.IMAML` with the config's ``imaml_lam`` and ``cg_steps``."""
    objective = get_algorithm(config.algorithm).objective
    if objective == "imaml":
        return IMAML(lam=config.imaml_lam, cg_steps=config.cg_steps)
    return objective


def meta_gradient(state: TrainState, ranks: Ranks | None = None) -> dict[str, float]:
    r"""Draw the next meta-batch, adapt, and leave the meta-gradient in every leaf's ``.grad``.

    With ``ranks``, every rank draws the whole meta-batch description (so the generator
    advances identically everywhere) and adapts only its share :math:`S_r` of the :math:`T`
    tasks; its loss is weighted by :math:`|S_r| / T` and the gradients are summed over the
    ranks, so every rank holds the gradient of the mean over all :math:`T` tasks:

    .. math:: \nabla \frac{1}{T}\sum_{t=1}^{T} \ell_t
        = \sum_r \frac{|S_r|}{T} \nabla \frac{1}{|S_r|} \sum_{t \in S_r} \ell_t

    The second-order terms stay inside each rank's backward pass: the meta-gradient is as
    exact as the single-process one. The loss and score returned (and checked for NaN) are
    the all-reduced ones, so every rank decides alike.

    Returns:
        ``{"loss": ..., score_name: ...}`` over the whole meta-batch.

    Raises:
        NonFiniteError: (a ``FloatingPointError``) the meta-loss or a meta-gradient is NaN or
            infinite (on any rank); no gradient is left to step with.
    """
    config = state.config
    epoch = state.iteration // config.iterations_per_epoch
    if ranks is None:
        tasks = state.problem.sample(config.meta_batch, state.generator)
    else:
        start, stop = ranks.share(config.meta_batch)
        tasks = state.problem.sample(config.meta_batch, state.generator, shard=(start, stop))
    leaves = state.leaves()
    loss, grads, score = value_and_grad(
        state.problem.loss_fn,
        state.params,
        tasks,
        state.inner_loop(epoch),
        wrt=leaves,
        strategy=state.strategy,
        score_fn=state.problem.score_fn,
        objective=objective_of(config),
    )
    # with ranks, each holds the gradient of its share, weighted by its size
    weight = 1.0 if ranks is None else (stop - start) / config.meta_batch
    for leaf, grad in zip(leaves, grads.wrt, strict=True):
        leaf.grad = None if grad is None else grad * weight
    if ranks is None:
        if not torch.isfinite(loss):
            raise _non_finite(loss, state.iteration, "")
        _check_gradients(state)
        return {"loss": loss.item(), state.problem.score_name: score.item()}
    objective = loss * weight
    # One all-reduce per step: the shares of the loss and score, which ranks went non-finite,
    # and the gradients. The step is decided on the sums, so every rank decides alike.
    totals = torch.zeros(2 + ranks.world_size, dtype=loss.dtype, device=loss.device)
    totals[0] = objective.detach()
    totals[1] = score.detach() * weight
    totals[2 + ranks.rank] = (~torch.isfinite(loss)).to(loss.dtype)
    grads = [leaf.grad for leaf in state.leaves() if leaf.grad is not None]
    ranks.all_reduce_many([totals, *grads])
    if not torch.isfinite(totals[0]):
        state.optimizer.zero_grad(set_to_none=True)  # nothing to step with
        culprits = totals[2:].nonzero().flatten().tolist()
        raise _non_finite(totals[0], state.iteration, f" (non-finite on rank {culprits})")
    _check_gradients(state)  # all-reduced: every rank sees the same gradients and decides alike
    return {"loss": totals[0].item(), state.problem.score_name: totals[1].item()}


def _non_finite(loss: torch.Tensor, iteration: int, culprits: str) -> NonFiniteError:
    return NonFiniteError(
        f"train(): the meta-loss is {loss.item()} at iteration {iteration + 1}{culprits}; "
        "the step was not taken. Lower --outer-lr or --inner-lr, or set --grad-clip."
    )


def _check_gradients(state: TrainState) -> None:
    """Raise :class:`NonFiniteError` (and drop the gradients) if any is NaN or infinite.

    A finite loss can still have a non-finite gradient (an overflow in the backward pass);
    Adam would spread it into every parameter, and clipping keeps a NaN a NaN.
    """
    grads = [leaf.grad for leaf in state.leaves() if leaf.grad is not None]
    if not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all()):
        return
    names = _leaf_names(state)
    bad = [
        name
        for name, leaf in zip(names, state.leaves(), strict=True)
        if leaf.grad is not None and not bool(leaf.grad.isfinite().all())
    ]
    state.optimizer.zero_grad(set_to_none=True)  # nothing to step with
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise NonFiniteError(
        f"train(): the meta-gradient of {shown} is NaN or infinite at iteration "
        f"{state.iteration + 1} (the meta-loss is finite); the step was not taken. Lower "
        "--inner-lr or --outer-lr, or use --dtype float64"
        + (" (with --precision float32)." if state.config.precision == "bf16" else ".")
    )


def _leaf_names(state: TrainState) -> list[str]:
    """Names for :meth:`TrainState.leaves`, in the same order: params, then rates."""
    names = list(state.params)
    per_step = isinstance(state.rates, list)
    for step, rates in enumerate(_rate_dicts(state.rates)):
        where = f" at step {step + 1}" if per_step else ""
        names += [f"the inner rate of {name}{where}" for name in rates]
    names += [f"the logit of the inner optimiser's {name}" for name in state.hyper_logits or {}]
    return names


def validate(
    state: TrainState, split: str = "val", ranks: Ranks | None = None
) -> dict[str, Any] | None:
    """Score the current parameters on the fixed validation episodes (None if no such split):
    ``{"score", "ci95"}`` after the last inner step, and ``"score_per_step"``, the mean after
    each step ``0 .. eval_inner_steps``.

    With ``ranks`` the episodes are split across them (every rank must call) and every rank
    gets the result of the whole set.
    """
    config = state.config
    try:
        scores = _episode_scores(
            state,
            state.problem,
            split,
            config.val_episodes,
            VAL_SEED,
            config.meta_batch,
            config.eval_inner_steps,
            ranks,
        )
    except EmptySplit:
        return None
    mean, ci95 = mean_ci95(scores[:, -1])
    per_step = scores.double().mean(0).tolist()  # steps 0..eval_inner_steps: did one do better?
    return {"score": mean, "ci95": ci95, "score_per_step": per_step}


def _episode_scores(
    state: TrainState,
    problem: Problem,
    split: str,
    num_episodes: int,
    seed: int,
    chunk: int,
    num_steps: int,
    ranks: Ranks | None,
) -> torch.Tensor:
    """``[num_episodes, num_steps + 1]`` scores; with ``ranks``, each rank scores its share.

    Raises:
        EmptySplit: ``split`` holds no classes (on every rank alike).
    """

    def scores_of(episodes):
        return evaluate(
            problem.score_fn,
            problem.loss_fn,
            state.params,
            episodes,
            state.eval_inner_loop(num_steps),
        )

    if ranks is None:
        return scores_of(problem.episodes(split, num_episodes, seed, chunk))
    start, stop = ranks.share(num_episodes)
    episodes = problem.episodes(split, num_episodes, seed, chunk, shard=(start, stop))
    if stop > start:
        local = scores_of(episodes)
    else:  # more ranks than episodes: nothing to score here, but the split must exist
        for _ in episodes:
            pass
        device = next(iter(state.params.values())).device
        local = torch.zeros(0, num_steps + 1, device=device)
    return ranks.gather_rows(local, start, num_episodes)


def train(
    config: TrainConfig | None,
    out_dir: str | Path,
    *,
    resume: bool | Literal["auto"] = False,
    iterations: int | None = None,
    on_step: Callable[[TrainState, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainState:
    """Meta-train to ``iterations`` in total, writing metrics and checkpoints in ``out_dir``.

    When ``torch.distributed`` is initialised (e.g. under ``torchrun``), every rank of the job
    must call this with the same arguments: each meta-batch is split across the ranks and
    their meta-gradients are averaged (:func:`meta_gradient`), so every rank takes the same
    step; the tasks of a step depend on the seed alone, not on the number of ranks. Rank 0
    alone reads the run folder and writes metrics and checkpoints (the other ranks need no
    shared file system); validation episodes are split across the ranks too.

    Args:
        config: the run's settings; ignored when resuming (the checkpoint's are used).
        out_dir: the run folder: ``metrics.jsonl``, ``latest.pt`` and, with
            ``config.keep_best``, ``best.pt`` (the best validation score; without a
            validation split, the same model as ``latest.pt``, written with it).
        resume: continue from ``out_dir/latest.pt``; ``"auto"``: continue if it exists,
            else start afresh (torchrun's elastic restarts use this).
        iterations: iterations to reach in this call; default ``config.iterations``. Fewer
            stop the run early (resume it later to go on to ``config.iterations``); more make
            the run longer: the new total is saved in its config, and the outer-rate schedule
            (``cosine_annealing``) follows it from here on.
        on_step: called after every step, on every rank, with the state and the step's
            metrics (over the whole meta-batch; ``validation``, ``validation_ci95`` and
            ``validation_per_step`` added on the steps that validated).
        should_stop: asked after every completed step (single process only); when it says
            ``True``, the run writes ``latest.pt`` at that iteration and returns early, so
            ``resume=True`` continues exactly there (the CLI asks it on Ctrl-C).

    Returns:
        The final :class:`TrainState` (on every rank).

    Raises:
        CheckpointError: resuming without a readable ``latest.pt``; starting in a folder that
            already holds a run.
        NonFiniteError: (a ``FloatingPointError``) a non-finite meta-loss or meta-gradient;
            names the iteration and the last good checkpoint (every rank raises, and no
            checkpoint is written with it).
        WriteError: (an ``OSError``) a checkpoint or metrics row could not be written (a full
            disk); the checkpoints written before are intact.
        RankFailure: another rank died or this one was stopped (distributed); names the
            iteration and the last checkpoint.
    """
    ranks = distributed.current()
    out = Path(out_dir)
    state = _open_run(config, out, resume, ranks)
    if iterations is not None and iterations > state.config.iterations:
        # the run made longer than planned: the new total is saved, and schedules follow it
        state.config = dataclasses.replace(state.config, iterations=iterations)
    config = state.config
    lead = ranks is None or ranks.rank == 0
    saved_at = state.iteration if state.iteration > 0 else None
    total = config.iterations if iterations is None else iterations
    # Without a validation split the best model is the latest: best.pt is written with it.
    without_validation = config.keep_best and "val" not in state.problem.splits
    checkpoints = (LATEST, BEST) if without_validation else (LATEST,)
    window_start, window_tasks = time.perf_counter(), 0
    log = open(out / METRICS, "a") if lead else None
    rest = peak.reset(config.device)
    try:
        while state.iteration < total:
            try:
                metrics = meta_step(state, ranks)
                window_tasks += config.meta_batch
                it = state.iteration
                if it % config.log_every == 0 or it == total:
                    elapsed = time.perf_counter() - window_start
                    metrics["tasks_per_s"] = window_tasks / max(elapsed, 1e-9)
                    if log is not None:
                        _write(log, {"iteration": it, "split": "train", **metrics})
                    window_start, window_tasks = time.perf_counter(), 0
                if it % config.val_every == 0 or it == total:
                    result = validate(state, ranks=ranks)
                    if result is not None:
                        metrics["validation"] = result["score"]
                        metrics["validation_ci95"] = result["ci95"]
                        metrics["validation_per_step"] = result["score_per_step"]
                        if log is not None:
                            _write(log, {"iteration": it, "split": "val", **result})
                        if _improves(state, result["score"]):
                            state.best = {"iteration": it, **result}
                            if lead and config.keep_best:
                                save_checkpoint(out / BEST, state_dict(state))
                if it % config.checkpoint_every == 0 or it == total:
                    if ranks is not None:
                        _check_in_step(state, ranks)
                    if lead:
                        _save(out, checkpoints, state)
                    saved_at = it
                if on_step is not None:
                    on_step(state, metrics)
                if ranks is None and should_stop is not None and should_stop():
                    if saved_at != it:
                        _save(out, checkpoints, state)
                        saved_at = it
                    break
            except NonFiniteError as error:
                raise NonFiniteError(f"{error} ({_last_good(out, saved_at)})") from None
            except RankFailure as error:
                where = _last_good(out, saved_at)
                rank = f"rank {ranks.rank} of {ranks.world_size}" if ranks else "this process"
                raise RankFailure(
                    f"train(): {rank} stopped at iteration {state.iteration + 1}: {error}. "
                    f"{where[0].upper()}{where[1:]}; continue with "
                    f"`torchrun ... cli.py train --resume {out}`."
                ) from None
    finally:
        if log is not None:
            log.close()
        state.peak_growth = peak.growth(config.device, rest)
    return state


def _save(out: Path, names: tuple[str, ...], state: TrainState) -> None:
    """Write the state to each of the run folder's checkpoint files ``names``."""
    contents = state_dict(state)
    for name in names:
        save_checkpoint(out / name, contents)


def _last_good(out: Path, saved_at: int | None) -> str:
    if saved_at is None:
        return "no checkpoint yet"
    return f"last good checkpoint: {out / LATEST} (iteration {saved_at})"


def _open_run(
    config: TrainConfig | None, out: Path, resume: bool | str, ranks: Ranks | None
) -> TrainState:
    """The state to train from: a fresh one, or the run folder's ``latest.pt``.

    Rank 0 alone looks at the folder and sends what it found to the other ranks, which then
    build the same state; the ranks check that they agree before the first step.
    """
    if not resume and config is None:
        raise ValueError("train(): pass a config to start a run, or resume=True.")
    if resume is True:
        config = None  # the checkpoint's settings are used
    if config is not None and ranks is not None and torch.device(config.device).type == "cuda":
        config = dataclasses.replace(config, device="cuda")  # each rank's own GPU
    # a new run fails on bad settings or data before the folder is touched
    state = init_state(config) if not resume else None
    found: dict[str, Any] | CheckpointError | None = None
    if ranks is None or ranks.rank == 0:
        try:
            found = _prepare_folder(out, resume)
        except CheckpointError as error:
            if ranks is None:
                raise
            found = error
    if ranks is not None:
        found = ranks.broadcast_object(found)
        if isinstance(found, CheckpointError):
            raise found
    if found is not None:
        saved_device = TrainConfig.from_dict(found["config"]).device
        local = ranks is not None and torch.device(saved_device).type == "cuda"
        state = _state_from(found, "cuda" if local else None)
    elif state is None:
        if config is None:
            raise CheckpointError(
                f"train(): {out} holds no latest.pt to resume from. Start the run with --out."
            )
        state = init_state(config)
    if ranks is not None:
        if state.config.meta_batch < ranks.world_size:
            raise ConfigError(
                f"train(): --meta-batch {state.config.meta_batch} is smaller than the "
                f"{ranks.world_size} ranks: every rank needs at least one task per step. Use "
                f"--meta-batch {ranks.world_size} or more, or fewer processes."
            )
        _check_in_step(state, ranks)
    return state


def _prepare_folder(out: Path, resume: bool | str) -> dict[str, Any] | None:
    """Check and prepare the run folder; the checkpoint to resume from, or None for a new run."""
    if resume == "auto" and not (out / LATEST).exists():
        _truncate_metrics(out / METRICS, 0)  # a restart before the first checkpoint
        resume = False
    if resume:
        saved = load_checkpoint(out / LATEST)
        _truncate_metrics(out / METRICS, saved["iteration"])
        return saved
    out.mkdir(parents=True, exist_ok=True)
    if (out / LATEST).exists():
        raise CheckpointError(
            f"train(): {out} already holds a run (latest.pt). "
            "Resume it with --resume, or choose another --out."
        )
    return None


def _check_in_step(state: TrainState, ranks: Ranks) -> None:
    """Raise on every rank unless all hold the same settings, parameters and generator."""
    device = next(iter(state.params.values())).device
    ranks.check_same(
        {
            "settings": distributed.fingerprint(state.config.to_dict()),
            "iteration": state.iteration,
            "parameters": distributed.fingerprint([t.detach() for t in state.leaves()]),
            "task generator": distributed.fingerprint(state.generator.get_state()),
        },
        device=device,
    )


def _improves(state: TrainState, score: float) -> bool:
    best = state.best.get("score")
    if best is None or math.isnan(best):
        return True
    return score > best if state.problem.higher_is_better else score < best


def _write(log, row: dict[str, Any]) -> None:
    try:
        log.write(json.dumps(row) + "\n")
        log.flush()
    except OSError as error:
        raise WriteError(
            f"train(): could not write a row of {log.name} ({error.strerror or error}); the "
            "checkpoints written so far are intact. Free space on that disk, then continue "
            "with `fmaml train --resume` on the run folder."
        ) from error


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric rows past the checkpoint being resumed; they will be written again.

    A last line cut short (the process was killed while writing it) is dropped too.

    Raises:
        CheckpointError: a line before the last is not a metrics row.
    """
    if not path.exists():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            row_iteration = int(row["iteration"])
        except (ValueError, KeyError, TypeError) as error:
            if number == len(lines):
                break  # a row whose writing was interrupted
            raise CheckpointError(
                f"train(): line {number} of {path} is not a metrics row ({error}): "
                f"{line[:60]!r}. Move the file aside to resume (its rows are not needed to "
                "continue training)."
            ) from None
        if row_iteration <= iteration:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def _rate_dicts(rates) -> list[dict]:
    if rates is None:
        return []
    return rates if isinstance(rates, list) else [rates]


def _detach_rates(rates):
    """Detached copies of the learned rates, keeping their shape (None, a dict or a list)."""
    if rates is None:
        return None
    if isinstance(rates, list):
        return [tree_clone(r) for r in rates]
    return tree_clone(rates)


TEST_SEED = 20171124
"""Test episodes are drawn from this seed by default: every model meets the same tasks."""


def evaluate_state(
    state: TrainState,
    *,
    split: str = "test",
    num_episodes: int = 600,
    num_steps: int | None = None,
    shots: int | None = None,
    query: int | None = None,
    ways: int | None = None,
    within_alphabet: bool | None = None,
    inner_lr: float | None = None,
    seed: int = TEST_SEED,
    chunk: int | None = None,
    across_ranks: bool = True,
) -> dict[str, Any]:
    """Adapt the trained model on fixed episodes and report the score after every step.

    When ``torch.distributed`` is initialised, the episodes are split across its ranks (every
    rank must call) and every rank gets the report of the whole set: the same mean and
    interval as one process scoring the same episodes.

    A model tested with other ``ways`` than it was trained with starts every task from a head
    whose rows (and bias entries, and learned per-element rates) all equal the mean of the
    trained ones: the classes of a MAML task come in random order, so the trained rows are
    interchangeable and their mean is the one start that treats every class alike. (With a
    prototype head, ``protonet`` and ``protomaml``, each task's head comes from its own
    support set whatever the ways.)

    Args:
        state: a trained run (:func:`train` or :func:`restore_state`).
        split: which classes (``"val"`` or ``"test"``; sinusoid draws fresh tasks).
        num_episodes: tasks to evaluate (600 in the MAML protocol).
        num_steps: inner steps; default the config's ``eval_inner_steps``.
        shots, query: support and query size per class; default the config's.
        ways: classes per task (classification); default the config's.
        within_alphabet: Omniglot: draw each task's classes from one alphabet (``True``) or
            from all (``False``); default the config's.
        inner_lr: the inner rate at test; default the config's (runs with learned rates
            use theirs and refuse another).
        seed: the episodes depend on this alone.
        chunk: tasks adapted at once (memory, per rank); default the training meta-batch.
        across_ranks: ``False`` scores every episode in this process, even in a distributed
            job.

    Returns:
        ``{"score_name", "split", "episodes", "inner_steps", "shots", "query_per_class",
        "ways", "inner_lr", "protocol", "iteration", "seed", "steps": [{"step", "mean", "ci95",
        "median"}, ...]}`` with one entry per step 0..num_steps; ``"protocol"`` is the
        problem's description of how the episodes were drawn (see
        :attr:`fmaml.training.problems.Problem.protocol`), e.g. ``{"protocol": "within-alphabet",
        "alphabets": {...}, "skipped_alphabets": {...}}``.

    Raises:
        ConfigError: (a ``ValueError``) ``ways`` or ``within_alphabet`` for a sinusoid
            run; ``within_alphabet`` for a dataset without alphabets; ``inner_lr`` for a run
            with learned rates, or not positive.
        DataError: the split can't serve the episodes (too few classes, no alphabet with
            ``ways`` characters).
    """
    config = state.config
    num_steps = config.eval_inner_steps if num_steps is None else num_steps
    wanted = {
        "shots": config.shots if shots is None else shots,
        "query": config.query if query is None else query,
        "ways": config.ways if ways is None else ways,
        "within_alphabet": config.within_alphabet if within_alphabet is None else within_alphabet,
    }
    if config.dataset == "sinusoid" and (ways is not None or within_alphabet):
        raise ConfigError(
            "evaluate_state(): `ways` and `within_alphabet` apply to classification; a "
            "sinusoid task has one output. Leave them unset (--ways, --within-alphabet)."
        )
    evaluated = state
    if inner_lr is not None:
        if state.rates is not None:
            raise ConfigError(
                f"evaluate_state(): this {config.algorithm} run learned its inner rates "
                f"({'LSLR' if config.lslr else 'per element'}); they are used at test. Leave "
                "inner_lr (--inner-lr) unset."
            )
        if not inner_lr > 0:
            raise ConfigError(f"evaluate_state(): inner_lr must be positive, got {inner_lr!r}.")
        evaluated = dataclasses.replace(
            state, config=dataclasses.replace(config, inner_lr=inner_lr)
        )
    if any(getattr(config, name) != value for name, value in wanted.items()):
        other = build_problem(resolve(dataclasses.replace(config, **wanted)), check_train=False)
        problem = dataclasses.replace(
            other,
            loss_fn=_stepwise_like(state.problem.loss_fn, other.loss_fn),
            score_fn=_stepwise_like(state.problem.score_fn, other.score_fn),
        )
        evaluated = dataclasses.replace(evaluated, problem=problem)
        if wanted["ways"] != config.ways:
            evaluated.params = _with_ways(state.params, config.ways, wanted["ways"])
            evaluated.rates = _with_ways(state.rates, config.ways, wanted["ways"])
    problem = evaluated.problem
    scores = _episode_scores(
        evaluated,
        problem,
        split,
        num_episodes,
        seed,
        chunk or config.meta_batch,
        num_steps,
        distributed.current() if across_ranks else None,
    )
    steps = []
    for step in range(num_steps + 1):
        mean, ci95 = mean_ci95(scores[:, step])
        median = scores[:, step].double().median().item()
        steps.append({"step": step, "mean": mean, "ci95": ci95, "median": median})
    return {
        "score_name": problem.score_name,
        "split": split,
        "episodes": int(scores.shape[0]),
        "inner_steps": num_steps,
        "shots": wanted["shots"],
        "query_per_class": wanted["query"],
        "ways": wanted["ways"],
        "inner_lr": evaluated.config.inner_lr if evaluated.rates is None else "learned",
        "protocol": problem.protocol(split) if problem.protocol is not None else {},
        "iteration": state.iteration,
        "seed": seed,
        "steps": steps,
    }


def _with_ways(tree, trained: int, ways: int):
    """``tree`` (parameters or learned rates) with every ``head.*`` tensor of ``trained`` rows
    resized to ``ways`` rows, each the mean of the trained rows (see :func:`evaluate_state`)."""
    if tree is None:
        return None
    if isinstance(tree, list):
        return [_with_ways(t, trained, ways) for t in tree]
    resized = {}
    for name, value in tree.items():
        if name.startswith("head.") and value.dim() >= 1 and value.shape[0] == trained:
            value = value.detach().mean(0, keepdim=True).expand(ways, *value.shape[1:]).clone()
        resized[name] = value
    return resized
