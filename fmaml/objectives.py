"""Meta-objectives: the query loss of one adapted task, and its mean over a meta-batch.

``task_loss``, ``reptile_loss`` and ``task_scores`` see one task; ``meta_loss`` and
``meta_scores`` are the one place fmaml vmaps over the task axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from fmaml.adapt import Call, Grad, at_step, direct, func_grad, trajectory
from fmaml.errors import public
from fmaml.implicit import IMAML, imaml_loss
from fmaml.inner_loop import InnerLoop, check_inner
from fmaml.inner_optim import check_inner_optimizer
from fmaml.padding import check_padded_tasks, is_padded
from fmaml.proto import check_head, check_support_labels
from fmaml.types import LossFn, Task

Objective = Literal["query", "reptile", "imaml"] | IMAML
"""What the outer step follows: the query loss (MAML and its variants), Reptile's direction,
or iMAML's implicit gradient (``"imaml"`` is ``IMAML()``)."""


@public
def task_loss(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: Task,
    inner: InnerLoop,
    *,
    score_fn: LossFn | None = None,
    objective: Objective = "query",
    grad: Grad = func_grad,
    call: Call = direct,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Adapt on ``task.support``, return the loss on ``task.query``; one task.

    .. math:: \ell(\theta) = \sum_{s=1}^{S} w_s\, L(\theta_s; \text{query}),
       \quad w = [0, \dots, 0, 1] \text{ by default (MAML)}

    Pure and differentiable in ``params`` and ``inner_lr`` (see :func:`fmaml.unroll`).

    Args:
        loss_fn: ``loss_fn(params, (x, y)) -> scalar``; used in the inner loop and on the query.
        params: ``{name: tensor}``, the meta-parameters.
        task: one :class:`fmaml.Task`, no task axis.
        inner: the inner loop's settings, one :class:`fmaml.InnerLoop`. Its
            ``step_weights`` (MAML++ multi-step loss) weight the query loss after each
            inner step: a 1-d tensor, or a sequence of numbers and 0-d tensors (each tensor
            differentiated, as in a stacked tensor); a weight that is the number 0 leaves
            that step's query loss out; ``None`` scores only the last step. Its
            ``head_init="prototypes"`` sets the linear head from the support set's class
            prototypes before the inner loop (:func:`fmaml.prototype_head`; ProtoMAML,
            Triantafillou et al. 2020), differentiably; ``num_steps=0`` then gives
            ProtoNet's loss (Snell et al. 2017).
        score_fn: if given, also return ``score_fn(adapted, query)`` (detached), e.g. accuracy.
        objective: ``"query"`` (above), or ``"reptile"``: :func:`reptile_loss` instead, whose
            gradient is ``params - adapted`` (``first_order`` then has no effect: Reptile is
            first-order whatever it says); or ``"imaml"`` / :class:`fmaml.IMAML` ``(lam,
            cg_steps)``: :func:`fmaml.imaml_loss` instead, the query loss after the
            regularised inner problem, whose gradient is the implicit meta-gradient.
        grad, call: how each inner step and query loss is computed (:mod:`fmaml.adapt`);
            the defaults are the definition. The engine (:func:`fmaml.value_and_grad`)
            passes others; the result is the same.

    Returns:
        A 0-d tensor; ``(loss, score)`` when ``score_fn`` is given.

    Raises:
        ValueError: ``step_weights`` of the wrong length, or given with
            ``objective="reptile"``; an unknown ``objective`` or ``head_init``; support
            labels outside ``0..num_ways-1`` or missing a class (checked outside ``vmap``);
            everything :func:`fmaml.unroll`, :func:`reptile_loss` and
            :func:`fmaml.prototype_head` raise.

    Example:
        >>> import torch, torch.nn.functional as F, fmaml
        >>> model = fmaml.nn.mlp(in_features=2, hidden=(8,), out_features=3)
        >>> loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
        >>> y = torch.arange(3).repeat(2)
        >>> task = fmaml.Task((torch.randn(6, 2), y), (torch.randn(6, 2), y))
        >>> protonet_loop = fmaml.InnerLoop(0.1, num_steps=0, head_init="prototypes")
        >>> protonet = task_loss(loss_fn, fmaml.params_of(model), task, protonet_loop)
        >>> protonet.shape
        torch.Size([])
    """
    check_inner(inner)
    objective = check_objective(objective)
    if isinstance(objective, IMAML):
        _refuse_for_imaml(inner)
        return imaml_loss(loss_fn, params, task, inner, settings=objective, score_fn=score_fn)
    if objective == "reptile":
        if inner.step_weights is not None or inner.head_init is not None:
            raise ValueError(
                "task_loss(): the inner loop has step_weights or head_init set, but Reptile's "
                "gradient is params - adapted: there is no query loss to weight, and the "
                "head is not set from prototypes. Use inner.replace(step_weights=None, "
                "head_init=None)."
            )
        return reptile_loss(loss_fn, params, task, inner, score_fn=score_fn, grad=grad)
    num_steps = inner.num_steps
    weights = check_step_weights(inner.step_weights, num_steps)
    steps = trajectory(loss_fn, params, task.support, inner, grad=grad, call=call)

    def at(s: int, fn: LossFn):
        def query(fast, task: Task) -> Tensor:
            return at_step(fn, s, task.support)({**steps.frozen, **fast}, task.query)

        return lambda: call(query, steps.fast[s], task, steps.shared[s])

    if weights is None:
        loss = at(num_steps, loss_fn)()
    else:
        loss = 0
        for s in range(1, num_steps + 1):
            w = weights[s - 1]
            if not (isinstance(w, (int, float)) and w == 0):
                loss = loss + w * at(s, loss_fn)()
    if score_fn is None:
        return loss
    with torch.no_grad():
        return loss, at(num_steps, score_fn)()


@public
def reptile_loss(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: Task,
    inner: InnerLoop,
    *,
    score_fn: LossFn | None = None,
    grad: Grad = func_grad,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Reptile for one task: a loss whose gradient with respect to ``params`` is
    ``params - adapted``.

    .. math:: \ell(\theta) = \tfrac12 \sum_k \lVert \theta_k - \operatorname{sg}(
       \tilde\theta_k) \rVert^2, \qquad \nabla_\theta \ell = \theta - \tilde\theta

    where :math:`\tilde\theta` = :func:`fmaml.adapt` (``params``, ``task.support``) after
    ``num_steps`` SGD steps, and :math:`\operatorname{sg}` stops the gradient. The inner
    loop trains on the task's **support set** only (the paper's inner loop trains on the
    task's training examples; here those are the support set); the query set is used only
    for ``score_fn``. Keys
    outside ``adapt_keys`` don't move, so their gradient is exactly zero.

    Averaged over tasks (:func:`fmaml.meta_loss` with ``objective="reptile"``, the one
    vmap), the gradient is Reptile's update direction
    :math:`\frac1T\sum_t (\theta - \tilde\theta_t)`, and every
    :class:`fmaml.Strategy` gives it unchanged, because it is the gradient of a loss. With
    one step it is ``inner_lr`` times the gradient of the mean support loss at ``params``
    (joint training); with two SGD steps at rate :math:`a` on the same loss it is
    :math:`a g_1 + a g(\theta - a g_1)`, which expands to :math:`2a\bar g - a^2 \bar H \bar g
    + O(a^3)` (the paper's section 5; exact on a quadratic).

    The paper's outer step interpolates, :math:`\theta \leftarrow \theta + \epsilon
    (\tilde\theta - \theta)`, i.e. SGD on this gradient at rate :math:`\epsilon`, and its
    few-shot runs used Adam in the inner loop. fmaml's inner loop is SGD at ``inner_lr``
    (the same as every algorithm's), and ``python cli.py train --algorithm reptile`` feeds
    this gradient to Adam at ``outer_lr``, as it does for every algorithm.

    Pure. The value is half the squared distance the inner loop moved. First-order: the
    inner gradients are constants (as with ``first_order=True``) and ``adapted`` is
    detached, so no inner step's graph is kept for the backward, whatever ``num_steps``.

    Args:
        loss_fn: ``loss_fn(params, (x, y)) -> scalar``, the inner-loop loss.
        params: ``{name: tensor}``, the meta-parameters.
        task: one :class:`fmaml.Task`, no task axis: ``support = (x [n_s, *feature],
            y [n_s, *target])`` trains the inner loop; ``query`` likewise, for ``score_fn``.
        inner: the settings, one :class:`fmaml.InnerLoop` (``first_order`` makes no
            difference; ``step_weights`` and ``head_init`` must be ``None``; ``inner_lr``
            and the inner optimiser's hyper-parameters must not require grad). The paper's
            few-shot runs used ``inner_optimizer=fmaml.inner_optim.adam(beta1=0.0)``.
        score_fn: if given, also return ``score_fn(adapted, query)`` (detached).
        grad: how each inner gradient is computed (:mod:`fmaml.adapt`; the default is the
            definition's).

    Returns:
        A 0-d tensor; ``(loss, score)`` when ``score_fn`` is given.

    Raises:
        ValueError: ``inner_lr`` or the hyper-parameters of ``inner_optimizer`` hold a
            tensor that requires grad (Reptile's update has no term for it), and everything
            :func:`fmaml.unroll` raises.

    Example:
        >>> import torch, fmaml
        >>> loss = lambda p, b: ((p["w"] - b[0]) ** 2).sum() / 2
        >>> params = {"w": torch.zeros(2, requires_grad=True)}
        >>> task = Task(support=(torch.ones(2), None), query=(torch.ones(2), None))
        >>> ell = reptile_loss(loss, params, task, fmaml.InnerLoop(0.5, num_steps=2))
        >>> torch.autograd.grad(ell, params["w"])[0]  # params - adapted = 0 - 0.75
        tensor([-0.7500, -0.7500])

    References:
        Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms",
        arXiv 1803.02999, 2018.
    """
    check_inner(inner)
    if inner.step_weights is not None or inner.head_init is not None:
        raise ValueError(
            "reptile_loss(): the inner loop has step_weights or head_init set, but Reptile's "
            "gradient is params - adapted: there is no query loss to weight, and the head "
            "is not set from prototypes. Use inner.replace(step_weights=None, head_init=None)."
        )
    _refuse_learned_rates(inner.inner_lr)
    _refuse_learned_hyper(inner.inner_optimizer)
    steps = trajectory(loss_fn, params, task.support, inner.replace(first_order=True), grad=grad)
    adapted = {k: v.detach() for k, v in steps.params(inner.num_steps).items()}
    loss = sum(0.5 * (params[k] - adapted[k]).square().sum() for k in params)
    if score_fn is None:
        return loss
    with torch.no_grad():
        score = at_step(score_fn, inner.num_steps, task.support)(adapted, task.query)
    return loss, score


def _refuse_learned_rates(inner_lr) -> None:
    """Raise if a tensor of ``inner_lr`` requires grad (checked on entry; safe under vmap)."""
    pending, found = [inner_lr], []
    while pending:
        value = pending.pop()
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, Mapping):
            pending.extend(value.values())
        elif isinstance(value, Sequence) and not isinstance(value, str):
            pending.extend(value)
    if any(t.requires_grad for t in found):
        raise ValueError(
            "reptile_loss(): `inner_lr` holds a tensor that requires grad, but Reptile's "
            "update (params - adapted) has no term for the inner rate: it would never be "
            "trained. Pass a number or detached rates, or learn the rates with a query-loss "
            "algorithm (metasgd, or --lslr)."
        )


def _refuse_learned_hyper(inner_optimizer) -> None:
    """Raise if a hyper-parameter of ``inner_optimizer`` requires grad (Reptile)."""
    hyper = getattr(inner_optimizer, "hyper", None) or {}
    learned = [k for k, v in hyper.items() if isinstance(v, Tensor) and v.requires_grad]
    if learned:
        raise ValueError(
            f"reptile_loss(): the inner optimiser's {', '.join(map(repr, learned))} requires "
            "grad, but Reptile's update (params - adapted) has no term for it: it would never "
            "be trained. Pass numbers or detached tensors, or learn the hyper-parameters with "
            "a query-loss algorithm (maml, metasgd)."
        )


def check_objective(objective) -> str | IMAML:
    """``objective`` checked; ``"imaml"`` becomes ``IMAML()``.

    Raises:
        ValueError: anything but ``"query"``, ``"reptile"``, ``"imaml"`` or an
            :class:`fmaml.IMAML`.
    """
    if isinstance(objective, IMAML):
        return objective
    if isinstance(objective, str) and objective == "imaml":
        return IMAML()
    if not isinstance(objective, str) or objective not in ("query", "reptile"):
        raise ValueError(
            "task_loss(): `objective` must be 'query' (MAML and its variants), 'reptile', "
            f"'imaml' or fmaml.IMAML(lam=..., cg_steps=...), got {objective!r}."
        )
    return objective


def check_meta_batch(loss_fn: LossFn, params, tasks: Task, inner: InnerLoop, objective) -> int:
    """Check a meta-batch and its settings where values can be read (before any ``vmap``):
    the task axis, padded sets, and with a prototype head every task's support labels.
    Returns the number of tasks.

    Raises:
        ValueError: tensors that disagree on the number of tasks; bad padded sets; a
            prototype head with padded sets, Reptile or iMAML, or with support labels
            outside ``0..num_ways-1`` or missing a class.
    """
    check_inner(inner)
    check_inner_optimizer(inner.inner_optimizer, "meta_loss")
    num_tasks = check_tasks(tasks)
    padded = check_padded_tasks(tasks, "meta_loss")
    if inner.head_init is None:
        return num_tasks
    if objective == "reptile":
        raise ValueError(
            "meta_loss(): head_init='prototypes' replaces the meta-learned head with one "
            "computed from each task's support set, but objective='reptile' follows "
            "params - adapted, which has no term for it. Use objective='query' (ProtoMAML), "
            "or head_init=None with Reptile."
        )
    if isinstance(objective, IMAML):
        raise ValueError(
            "meta_loss(): head_init='prototypes' with iMAML is not supported: the implicit "
            "meta-gradient is taken at the end of the inner problem, with no term for a "
            "starting head computed from the support set. Use objective='query' "
            "(ProtoMAML), or head_init=None with iMAML."
        )
    if padded and is_padded(tasks.support):
        raise ValueError(
            "meta_loss(): head_init='prototypes' averages every support example of a class, "
            "but the support set is padded (x, y, mask): padded rows would enter the "
            "prototypes. Use head_init=None with padded tasks, or tasks of one shape."
        )
    num_ways, _ = check_head(loss_fn, params, "meta_loss")
    check_support_labels(tasks.support[1], num_ways, "meta_loss")
    return num_tasks


def _refuse_for_imaml(inner: InnerLoop) -> None:
    if inner.inner_optimizer is not None:
        raise ValueError(
            "task_loss(): iMAML solves its regularised inner problem by plain gradient descent "
            "(its implicit gradient assumes the inner problem solved, whatever the optimiser), "
            f"and takes no inner_optimizer; got {inner.inner_optimizer!r}. Leave "
            "inner_optimizer=None with iMAML."
        )
    if inner.step_weights is not None:
        raise ValueError(
            "task_loss(): `step_weights` weight the query loss after each inner step, but "
            "iMAML's meta-gradient is taken at the end of the inner problem only (no inner "
            "step is differentiated). Leave step_weights=None with iMAML."
        )
    if inner.first_order:
        raise ValueError(
            "task_loss(): `first_order=True` drops the second-order terms of the gradient "
            "through the inner steps, but iMAML differentiates no inner step: its implicit "
            "gradient has no first-order form to switch to. Leave first_order=False with "
            "iMAML, or use objective='query' with first_order=True for first-order MAML."
        )


@public
def task_scores(
    score_fn: LossFn,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: Task,
    inner: InnerLoop,
) -> Tensor:
    """Adapt on the support with ``loss_fn``; score the query after every step; one task.

    Used for evaluation: ``score_fn`` may be the loss itself (regression MSE) or a metric
    such as :func:`fmaml.accuracy` wrapped by :func:`fmaml.supervised_loss`. ``inner`` as
    in :func:`task_loss` (a prototype head: the scores start from it; ``first_order`` and
    ``step_weights`` make no difference to scores).

    Returns:
        ``[num_steps + 1]``: the score before adapting and after each inner step.
    """
    steps = trajectory(loss_fn, params, task.support, inner)
    return torch.stack(
        [
            at_step(score_fn, s, task.support)(steps.params(s), task.query)
            for s in range(len(steps.fast))
        ]
    )


@public
def meta_loss(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    tasks: Task,
    inner: InnerLoop,
    *,
    score_fn: LossFn | None = None,
    objective: Objective = "query",
) -> Tensor | tuple[Tensor, Tensor]:
    r"""The mean query loss over a meta-batch of tasks, each adapted on its own support.

    .. math:: \mathcal{L}(\theta) = \frac{1}{T} \sum_{t=1}^{T} \ell_t(\theta)

    All tasks adapt at once: :func:`task_loss` is vmapped over the leading task axis.
    ``torch.autograd.grad(meta_loss(...), params.values())`` is the exact second-order
    meta-gradient (Finn, Abbeel & Levine, ICML 2017); ``first_order=True`` gives FOMAML,
    ``adapt_keys`` ANIL/BOIL, a learned dict ``inner_lr`` Meta-SGD, a sequence of them and
    ``step_weights`` MAML++; ``objective="reptile"`` averages :func:`reptile_loss`
    instead, whose gradient is Reptile's direction, the mean of ``params - adapted``;
    ``objective=fmaml.IMAML(lam, cg_steps)`` averages :func:`fmaml.imaml_loss`, whose
    gradient is iMAML's implicit meta-gradient (Rajeswaran et al., NeurIPS 2019).

    Args:
        loss_fn: ``loss_fn(params, (x, y)) -> scalar`` for one task's batch.
        params: ``{name: tensor}``.
        tasks: a :class:`fmaml.Task` whose tensors have a leading task axis:
            ``support = (x [T, n_s, *feature], y [T, n_s, *target])``, ``query`` likewise;
            for tasks of different sizes, padded sets ``(x, y, mask [T, n_s] bool[,
            classes [T, C] bool])`` from :func:`fmaml.tasks.pad_tasks`: each task's loss
            is then that of the task alone (real rows only, BatchNorm statistics too), on
            every strategy but ``compile``.
        inner: the inner loop's settings, one :class:`fmaml.InnerLoop` (as in
            :func:`task_loss`; with a prototype head, the support labels of every task
            are checked here, at once).
        score_fn: if given, also return the mean of ``score_fn(adapted, query)`` over tasks.
        objective: ``"query"``, ``"reptile"``, ``"imaml"`` or an :class:`fmaml.IMAML`, as in
            :func:`task_loss`.

    Returns:
        A 0-d tensor; ``(loss, score)`` when ``score_fn`` is given.

    Raises:
        ValueError: tasks whose tensors disagree on the number of tasks; padded sets with
            a mask or ``classes`` of the wrong shape or dtype, a task with no real support
            or query example or no class, or with ``head_init="prototypes"`` (refused); and
            everything :func:`task_loss` raises.

    Example:
        >>> import torch, torch.nn.functional as F, fmaml
        >>> model = fmaml.nn.mlp()
        >>> params = fmaml.params_of(model)
        >>> loss_fn = fmaml.supervised_loss(model, F.mse_loss)
        >>> g = torch.Generator().manual_seed(0)
        >>> tasks = fmaml.tasks.SinusoidTasks(num_shots=5).sample(4, g)
        >>> loss = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.01))
        >>> grads = torch.autograd.grad(loss, list(params.values()))
    """
    objective = check_objective(objective)
    check_meta_batch(loss_fn, params, tasks, inner, objective)
    per_task = over_tasks(
        lambda task: task_loss(
            loss_fn, params, task, inner, score_fn=score_fn, objective=objective
        ),
        tasks,
    )
    if score_fn is None:
        return per_task.mean()
    losses, scores = per_task
    return losses.mean(), scores.mean()


@public
def meta_scores(
    score_fn: LossFn,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    tasks: Task,
    inner: InnerLoop,
) -> Tensor:
    """:func:`task_scores` for every task of a meta-batch.

    Returns:
        ``[T, num_steps + 1]``: each task's query score before adapting and after each step.
    """
    check_meta_batch(loss_fn, params, tasks, inner, "query")
    return over_tasks(lambda task: task_scores(score_fn, loss_fn, params, task, inner), tasks)


def over_tasks(per_task, tasks: Task) -> Tensor:
    """``per_task`` on every task of ``tasks``: the one vmap over the task axis (the engine
    runs its chunks through it too)."""
    check_tasks(tasks)
    return torch.func.vmap(per_task)(tasks)


def check_tasks(tasks: Task) -> int:
    """The number of tasks in a meta-batch; raises if its tensors disagree on it."""
    if not isinstance(tasks, Task):
        raise TypeError(
            f"meta_loss(): `tasks` must be an fmaml.Task(support=(x, y), query=(x, y)), "
            f"got {type(tasks).__name__}."
        )
    sizes = {
        f"{part}[{i}]": tuple(t.shape)
        for part, pair in (("support", tasks.support), ("query", tasks.query))
        for i, t in enumerate(pair)
    }
    counts = {shape[0] if shape else None for shape in sizes.values()}
    if len(counts) != 1 or None in counts:
        listing = ", ".join(f"{k}: {list(v)}" for k, v in sizes.items())
        raise ValueError(
            "meta_loss(): every tensor of `tasks` needs the same leading task axis "
            f"[num_tasks, ...]; got {listing}. Stack tasks along dim 0 "
            "(for one task, use task_loss or add the axis with x[None])."
        )
    return counts.pop()


def check_step_weights(step_weights, num_steps: int):
    """``step_weights`` as given, after checking it has one weight per inner step (``None``
    stays ``None``); raises ``ValueError`` otherwise."""
    if step_weights is None:
        return None
    if num_steps == 0:
        raise ValueError(
            "task_loss(): `step_weights` weight the query loss after each inner step, but "
            "num_steps=0 has none. Leave step_weights=None without inner steps."
        )
    length = len(step_weights)
    if length != num_steps:
        raise ValueError(
            f"task_loss(): `step_weights` has {length} entries but `num_steps` is {num_steps}. "
            "Give one weight per inner step; [0, ..., 0, 1] is plain MAML."
        )
    return step_weights
