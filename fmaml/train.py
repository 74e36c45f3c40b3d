"""The outer loop: the one stateful shell around the pure functions.

``train(config, out_dir)`` meta-trains, logs metrics to ``metrics.jsonl``, validates on fixed
episodes, and keeps ``latest.pt`` and ``best.pt`` checkpoints that hold everything needed to
resume bit-for-bit on the CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fmaml.adapt import InnerLR, init_rates
from fmaml.algorithms import get_algorithm
from fmaml.checkpoint import (
    BEST,
    LATEST,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fmaml.config import TrainConfig, resolve
from fmaml.evaluate import evaluate, mean_ci95
from fmaml.module import params_of, per_step
from fmaml.objectives import meta_loss
from fmaml.problems import EmptySplit, Problem, build_problem
from fmaml.schedules import cosine_lr, first_order_at, msl_weights
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

    def leaves(self) -> list[torch.Tensor]:
        """Every meta-learned tensor, in a fixed order (the optimizer's)."""
        rates = self.rates if isinstance(self.rates, list) else [self.rates or {}]
        return list(self.params.values()) + [v for r in rates for v in r.values()]


def init_state(config: TrainConfig) -> TrainState:
    """A fresh run: model, learned rates (if the algorithm has them), Adam, task generator.

    MAML++ settings shape the parameters here: ``lslr`` gives one learned rate per tensor and
    step; ``per_step_bn`` gives the BatchNorm weights and biases one copy per step (BNWB) and
    keeps them out of the inner loop, as MAML++ does; ``bn_statistics="support"`` normalises
    each query with the statistics of its own support set at the same step (BNRS, leak-free).
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
    state = TrainState(config, problem, params, rates, None, generator, adapt_keys=adapt_keys)  # type: ignore[arg-type]
    state.optimizer = torch.optim.Adam(state.leaves(), lr=config.outer_lr)
    return state


def _stepwise_like(template, fresh):
    """``fresh`` (a loss for other shots) with the per-step parameters of ``template``."""
    out = copy.copy(fresh)
    out.per_step_keys, out.stepwise = template.per_step_keys, template.stepwise
    out.support_statistics = template.support_statistics
    return out


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
        device: move the run to this device (the task generator then restarts from the
            seed: its state belongs to the device that saved it).
    """
    saved = load_checkpoint(path)
    config = TrainConfig.from_dict(saved["config"])
    moved = device is not None and device != config.device
    if moved:
        config = dataclasses.replace(config, device=device)
    state = init_state(config)
    with torch.no_grad():
        for name, value in saved["params"].items():
            state.params[name].copy_(value)
        for mine, theirs in zip(_rate_dicts(state.rates), _rate_dicts(saved["rates"]), strict=True):
            for name, value in theirs.items():
                mine[name].copy_(value)
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
        "params": {k: v.detach().clone() for k, v in state.params.items()},
        "rates": _detach_rates(state.rates),
        "optimizer": state.optimizer.state_dict(),
        "generator": state.generator.get_state(),
        "best": dict(state.best),
    }


def meta_step(state: TrainState) -> dict[str, float]:
    """One outer step: sample a meta-batch, adapt, back-propagate, update. Returns metrics.

    Raises:
        FloatingPointError: if the meta-loss is NaN or infinite; the parameters are left
            unchanged (the step is not taken).
    """
    config = state.config
    algorithm = get_algorithm(config.algorithm)
    epoch = state.iteration // config.iterations_per_epoch
    if config.cosine_annealing:
        lr = cosine_lr(state.iteration, config.iterations, config.outer_lr, config.min_outer_lr)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
    tasks = state.problem.sample(config.meta_batch, state.generator)
    loss, score = meta_loss(
        state.problem.loss_fn,
        state.params,
        tasks,
        inner_lr=state.inner_lr,
        num_steps=config.inner_steps,
        adapt_keys=state.adapt_keys,
        first_order=algorithm.first_order or first_order_at(epoch, config.da_epochs),
        step_weights=msl_weights(config.inner_steps, epoch, config.msl_epochs),
        score_fn=state.problem.score_fn,
    )
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"train(): the meta-loss is {loss.item()} at iteration {state.iteration + 1}; "
            "the step was not taken. Lower --outer-lr or --inner-lr, or set --grad-clip."
        )
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip is not None:
        for leaf in state.leaves():
            if leaf.grad is not None:
                leaf.grad.clamp_(-config.grad_clip, config.grad_clip)
    state.optimizer.step()
    state.iteration += 1
    return {"loss": loss.item(), state.problem.score_name: score.item()}


def validate(state: TrainState, split: str = "val") -> dict[str, float] | None:
    """Score the current parameters on the fixed validation episodes (None if no such split)."""
    config = state.config
    try:
        episodes = state.problem.episodes(split, config.val_episodes, VAL_SEED, config.meta_batch)
        scores = evaluate(
            state.problem.score_fn,
            state.problem.loss_fn,
            state.params,
            episodes,
            inner_lr=state.inner_lr_for(config.eval_inner_steps),
            num_steps=config.eval_inner_steps,
            adapt_keys=state.adapt_keys,
        )
    except EmptySplit:
        return None
    mean, ci95 = mean_ci95(scores[:, -1])
    return {"score": mean, "ci95": ci95}


def train(
    config: TrainConfig | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    iterations: int | None = None,
    on_step: Callable[[TrainState, dict[str, float]], None] | None = None,
) -> TrainState:
    """Meta-train to ``iterations`` in total, writing metrics and checkpoints in ``out_dir``.

    Args:
        config: the run's settings; ignored when resuming (the checkpoint's are used).
        out_dir: the run folder: ``metrics.jsonl``, ``latest.pt``, ``best.pt``.
        resume: continue from ``out_dir/latest.pt``.
        iterations: total iterations to reach; default ``config.iterations``.
        on_step: called after every step with the state and the step's metrics (progress).

    Returns:
        The final :class:`TrainState`.

    Raises:
        CheckpointError: resuming without a readable ``latest.pt``.
        FloatingPointError: a non-finite meta-loss; names the last good checkpoint.
    """
    out = Path(out_dir)
    if resume:
        state = restore_state(out / LATEST)
        _truncate_metrics(out / METRICS, state.iteration)
    else:
        state = init_state(config)
        out.mkdir(parents=True, exist_ok=True)
        if (out / LATEST).exists():
            raise CheckpointError(
                f"train(): {out} already holds a run (latest.pt). "
                "Resume it with --resume, or choose another --out."
            )
    config = state.config
    total = config.iterations if iterations is None else iterations
    window_start, window_tasks = time.perf_counter(), 0
    with open(out / METRICS, "a") as log:
        while state.iteration < total:
            try:
                metrics = meta_step(state)
            except FloatingPointError as error:
                last = out / LATEST
                where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint yet"
                raise FloatingPointError(f"{error} ({where})") from None
            window_tasks += config.meta_batch
            it = state.iteration
            if it % config.log_every == 0 or it == total:
                elapsed = time.perf_counter() - window_start
                metrics["tasks_per_s"] = window_tasks / max(elapsed, 1e-9)
                _write(log, {"iteration": it, "split": "train", **metrics})
                window_start, window_tasks = time.perf_counter(), 0
            if it % config.val_every == 0 or it == total:
                result = validate(state)
                if result is not None:
                    _write(log, {"iteration": it, "split": "val", **result})
                    if _improves(state, result["score"]):
                        state.best = {"iteration": it, **result}
                        save_checkpoint(out / BEST, state_dict(state))
            if it % config.checkpoint_every == 0 or it == total:
                save_checkpoint(out / LATEST, state_dict(state))
            if on_step is not None:
                on_step(state, metrics)
    if not (out / BEST).exists():  # no validation split: the final model is the best we know
        save_checkpoint(out / BEST, state_dict(state))
    return state


def _improves(state: TrainState, score: float) -> bool:
    best = state.best.get("score")
    if best is None or math.isnan(best):
        return True
    return score > best if state.problem.higher_is_better else score < best


def _write(log, row: dict[str, Any]) -> None:
    log.write(json.dumps(row) + "\n")
    log.flush()


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric rows past the checkpoint being resumed; they will be written again."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["iteration"] <= iteration]
    path.write_text("".join(line + "\n" for line in kept))


def _rate_dicts(rates) -> list[dict]:
    if rates is None:
        return []
    return rates if isinstance(rates, list) else [rates]


def _detach_rates(rates):
    if rates is None:
        return None
    if isinstance(rates, list):
        return [{k: v.detach().clone() for k, v in r.items()} for r in rates]
    return {k: v.detach().clone() for k, v in rates.items()}


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
    seed: int = TEST_SEED,
    chunk: int | None = None,
) -> dict[str, Any]:
    """Adapt the trained model on fixed episodes and report the score after every step.

    Args:
        state: a trained run (:func:`train` or :func:`restore_state`).
        split: which classes (``"val"`` or ``"test"``; sinusoid draws fresh tasks).
        num_episodes: tasks to evaluate (600 in the MAML protocol).
        num_steps: inner steps; default the config's ``eval_inner_steps``.
        shots, query: support and query size per class; default the config's.
        seed: the episodes depend on this alone.
        chunk: tasks adapted at once (memory); default the training meta-batch.

    Returns:
        ``{"score_name", "episodes", "inner_steps", "shots", "query_per_class", "steps":
        [{"step", "mean", "ci95", "median"}, ...]}`` with one entry per step 0..num_steps.
    """
    config = state.config
    num_steps = config.eval_inner_steps if num_steps is None else num_steps
    shots = config.shots if shots is None else shots
    query = config.query if query is None else query
    problem = state.problem
    if (shots, query) != (config.shots, config.query):
        other = build_problem(resolve(dataclasses.replace(config, shots=shots, query=query)))
        problem = dataclasses.replace(
            other,
            loss_fn=_stepwise_like(state.problem.loss_fn, other.loss_fn),
            score_fn=_stepwise_like(state.problem.score_fn, other.score_fn),
        )
    scores = evaluate(
        problem.score_fn,
        problem.loss_fn,
        state.params,
        problem.episodes(split, num_episodes, seed, chunk or config.meta_batch),
        inner_lr=state.inner_lr_for(num_steps),
        num_steps=num_steps,
        adapt_keys=state.adapt_keys,
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
        "shots": shots,
        "query_per_class": query,
        "seed": seed,
        "steps": steps,
    }
