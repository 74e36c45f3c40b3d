"""Adapt-then-score on held-out episodes; mean and 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from fmaml.errors import public
from fmaml.inner_loop import InnerLoop, InnerLR, check_inner
from fmaml.objectives import meta_scores
from fmaml.tree import tree_detach
from fmaml.types import LossFn, Task


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% interval, ``1.96 * std / sqrt(n)`` (MAML protocol).

    Args:
        values: ``[n]`` per-episode scores.

    Returns:
        ``(mean, ci95)`` as floats; ``ci95`` is 0 for a single value.

    Example:
        >>> import torch
        >>> mean, ci95 = mean_ci95(torch.tensor([1.0, 3.0]))
        >>> mean, round(ci95, 6)
        (2.0, 1.96)
    """
    values = values.detach().double().flatten()
    if values.numel() == 0:
        raise ValueError("mean_ci95(): got no values; evaluate at least one episode.")
    std = values.std(unbiased=True).item() if values.numel() > 1 else 0.0
    return values.mean().item(), 1.96 * std / math.sqrt(values.numel())


@public
def evaluate(
    score_fn: LossFn,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    episodes: Iterable[Task],
    inner: InnerLoop,
) -> Tensor:
    """Adapt on each episode's support and score its query after every inner step.

    The meta-parameters are detached: evaluation builds no meta-gradient graph.

    Args:
        score_fn: ``(params, (x, y)) -> scalar`` score on the query (accuracy, MSE, ...).
        loss_fn: the inner-loop loss.
        params: meta-parameters.
        episodes: meta-batches of tasks (chunks of the evaluation set), each a
            :class:`fmaml.Task` with a leading task axis.
        inner: the inner loop, one :class:`fmaml.InnerLoop` (``first_order`` and
            ``step_weights`` make no difference to scores; its tensors are detached).

    Returns:
        ``[num_episodes, num_steps + 1]``: scores before adapting and after each step.
    """
    loop = check_inner(inner)
    params = tree_detach(params)
    inner_optimizer = loop.inner_optimizer
    if inner_optimizer is not None:
        hyper = {k: _detach_rates(v) for k, v in inner_optimizer.hyper.items()}
        inner_optimizer = inner_optimizer._replace(hyper=hyper)
    loop = loop.replace(
        inner_lr=_detach_rates(loop.inner_lr),
        inner_optimizer=inner_optimizer,
        first_order=False,
        step_weights=None,
    )
    chunks = [meta_scores(score_fn, loss_fn, params, tasks, loop).detach() for tasks in episodes]
    return torch.cat(chunks)


def _detach_rates(inner_lr: InnerLR) -> InnerLR:
    if isinstance(inner_lr, Tensor):
        return inner_lr.detach()
    if isinstance(inner_lr, Mapping):
        return tree_detach(inner_lr)
    if isinstance(inner_lr, (list, tuple)):
        return [_detach_rates(r) for r in inner_lr]
    return inner_lr
