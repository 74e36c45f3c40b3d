"""The inner loop: gradient steps on one task's support set, as a pure function.

``unroll`` returns every step's parameters; ``adapt`` returns the last. Both are written for
one task (no task axis); :func:`fmaml.meta_loss` vmaps them over a meta-batch.
"""

from __future__ import annotations

import contextvars
import functools
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fmaml.graph import reached_leaves
from fmaml.inner_loop import UNSET, InnerLoop, InnerLR, Rate, settings
from fmaml.inner_optim import InnerOptimizer, State, check_inner_optimizer
from fmaml.padding import is_padded
from fmaml.tree import KeySelector, select
from fmaml.types import Batch, LossFn, Params, options_of


def unroll(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    inner: InnerLoop | None = None,
    *,
    inner_lr: InnerLR = UNSET,
    num_steps: int = UNSET,
    adapt_keys: KeySelector = UNSET,
    first_order: bool = UNSET,
    inner_optimizer: InnerOptimizer | None = UNSET,
) -> list[Params]:
    r"""Run ``num_steps`` of gradient descent on the support loss; return every iterate.

    .. math:: \theta_{s+1} = \theta_s - \alpha_s \odot \nabla_\theta L(\theta_s; \text{support})

    (or another optimiser's step on the same gradient, with ``inner_optimizer``)

    Pure: builds new dicts, never changes ``params``. Differentiable with respect to
    ``params`` and to any tensor in ``inner_lr``: the result carries the full second-order
    graph (MAML). With ``first_order=True`` the inner gradients are treated as constants
    (first-order MAML, Finn et al. 2017, section 5.2). Parameters outside ``adapt_keys`` are
    held fixed in the inner loop (ANIL, Raghu et al. 2020; BOIL, Oh et al. 2021) but still
    receive meta-gradients.

    Args:
        loss_fn: ``loss_fn(params, (x, y)) -> scalar``, e.g. :func:`fmaml.supervised_loss`.
        params: ``{name: tensor}``, the starting point (meta-parameters).
        support: ``(x, y)`` of one task, ``x: [num_support, *feature]``.
        inner: the settings as one :class:`fmaml.InnerLoop` (its ``step_weights`` do not
            matter here; its ``head_init`` must be ``None``: the prototype head is set by
            :func:`fmaml.task_loss`); or, instead, the keywords below (defaults as in
            :class:`fmaml.InnerLoop`).
        inner_lr: a number or 0-d tensor; a dict ``{name: tensor}`` over exactly the adapted
            names, each of shape ``[]`` or the parameter's shape (Meta-SGD); or a sequence of
            ``num_steps`` of these, one per step (MAML++ LSLR).
        num_steps: inner gradient steps, at least 1 (default 1).
        adapt_keys: which parameters to adapt: a predicate on the name, a collection of
            names, or ``None`` for all.
        first_order: stop gradients through the inner gradients (FOMAML).
        inner_optimizer: the inner step (:mod:`fmaml.inner_optim`: ``sgd()``,
            ``momentum(beta)``, ``adam(beta1, beta2, eps)``), at the rates ``inner_lr``;
            its hyper-parameter tensors are differentiated like ``inner_lr``'s. ``None``:
            plain SGD.

    Returns:
        ``[params, adapted_1, ..., adapted_num_steps]``: ``num_steps + 1`` dicts with the keys of
        ``params`` in the same order.

    Raises:
        ValueError: ``num_steps`` below 1; ``adapt_keys`` empty or naming unknown parameters;
            rate dicts whose keys or shapes do not match the adapted parameters; a rate
            sequence whose length is not ``num_steps``; a hyper-parameter tensor of
            ``inner_optimizer`` that is not 0-d.
        TypeError: ``inner_optimizer`` not an :class:`fmaml.inner_optim.InnerOptimizer`;
            ``inner`` together with keywords, or neither ``inner`` nor ``inner_lr``.

    Example:
        >>> import torch
        >>> loss = lambda p, b: ((p["w"] - b[0]) ** 2).sum() / 2
        >>> steps = unroll(loss, {"w": torch.zeros(2)}, (torch.ones(2), None),
        ...                inner_lr=0.5, num_steps=2)
        >>> [s["w"].tolist() for s in steps]
        [[0.0, 0.0], [0.5, 0.5], [0.75, 0.75]]
    """
    loop = settings(
        inner,
        "unroll",
        inner_lr=inner_lr,
        num_steps=num_steps,
        adapt_keys=adapt_keys,
        first_order=first_order,
        inner_optimizer=inner_optimizer,
    )
    if loop.head_init is not None:
        raise ValueError(
            f"unroll(): the inner loop has head_init={loop.head_init!r}, which sets the "
            "linear head from the support set before the first step; unroll and adapt take "
            "the head in `params` as it is. Use fmaml.task_loss / fmaml.meta_loss (they set "
            "the head first), or inner.replace(head_init=None)."
        )
    _check_num_steps(loop.num_steps, "unroll")
    check_inner_optimizer(loop.inner_optimizer, "adapt")
    names = select(params.keys(), loop.adapt_keys, caller="adapt")
    rates = step_rates(loop.inner_lr, params, names, loop.num_steps, caller="adapt")
    frozen = {k: v for k, v in params.items() if k not in set(names)}
    fast = {k: params[k] for k in names}
    state = None
    trajectory = [dict(params)]
    for step, rate in enumerate(rates):
        grads = _inner_grads(fast, at_step(loss_fn, step), frozen, support, loop.first_order)
        fast, state = inner_step(grads, state, fast, rate, loop.inner_optimizer)
        trajectory.append({k: fast.get(k, v) for k, v in params.items()})
    return trajectory


def inner_step(
    grads: Params,
    state: State | None,
    fast: Params,
    rate: Mapping[str, float | Tensor],
    inner_optimizer: InnerOptimizer | None,
) -> tuple[Params, State | None]:
    """One inner step from ``fast`` along ``grads``: the one step every path takes
    (:func:`unroll` and the recomputing strategy, :mod:`fmaml.engine.strategy`).

    ``inner_optimizer=None`` is plain SGD, ``fast - rate * grads``, with no state; otherwise
    ``state=None`` before the first step (the optimiser's ``init(fast)`` is used).

    Returns:
        ``(fast, state)`` after the step, new dicts.
    """
    if inner_optimizer is None:
        return {k: fast[k] - rate[k] * grads[k] for k in fast}, None
    if state is None:
        state = inner_optimizer.init(fast)
    return inner_optimizer.update(grads, state, fast, rate, inner_optimizer.hyper)


def support_loss(fast: Params, loss_fn: LossFn, frozen: Params, support: Batch) -> Tensor:
    """The support loss as a function of the adapted parameters alone (argument 0): what
    every inner step differentiates."""
    return loss_fn({**frozen, **fast}, support)


PLAIN_AUTOGRAD = contextvars.ContextVar("fmaml_plain_autograd", default=False)
"""Set by the strategies that run one task at a time outside any ``torch.func`` transform
(:mod:`fmaml.engine.strategy`): the inner gradients then come from ``torch.autograd.grad``, the same
values and graph with less overhead per op than ``torch.func.grad``'s wrappers, and no graph
at all for first-order steps. With grad enabled, second-order steps always keep the graph, so
tensors a ``loss_fn`` captures are differentiated through the inner loop as under
``torch.func.grad``."""

STAND_INS = contextvars.ContextVar("fmaml_stand_ins", default=None)
"""A list set by :mod:`fmaml.engine.strategy` while a chunk runs: the leaves :func:`_inner_grads`
creates to stand for parameters that don't require grad (so that ``torch.autograd.grad`` can
differentiate with respect to them). They are constants of the meta-loss; the strategy skips
them when it looks for tensors a ``loss_fn`` captures."""


def _inner_grads(
    fast: Params, loss_fn: LossFn, frozen: Params, support: Batch, first_order: bool
) -> Params:
    """The support loss's gradient with respect to ``fast``; constants if ``first_order``."""
    if not PLAIN_AUTOGRAD.get():
        grads = torch.func.grad(support_loss)(fast, loss_fn, frozen, support)
        return {k: g.detach() for k, g in grads.items()} if first_order else grads
    tensors = [*fast.values(), *frozen.values(), *(t for t in support if isinstance(t, Tensor))]
    passed_in = any(t.requires_grad for t in tensors)
    # With grad enabled the graph is built even if nothing passed in requires grad: a tensor
    # the loss captures may (it is kept only if the graph reaches one).
    keep = torch.is_grad_enabled() and not first_order
    stand_ins = STAND_INS.get()
    with torch.enable_grad():
        # A view, not ``v`` itself: the gradient is the one through the loss's use of
        # ``fast``, as torch.func.grad gives it, not also through a tensor the loss captures
        # that happens to be ``v`` (``params[k]`` in a regulariser).
        inputs = {
            k: v.view_as(v) if keep and v.requires_grad else v.detach().requires_grad_()
            for k, v in fast.items()
        }
        made = [v for v in inputs.values() if v.grad_fn is None]  # the stand-ins
        loss = support_loss(inputs, loss_fn, frozen, support)
        grads = torch.autograd.grad(
            loss, list(inputs.values()), create_graph=keep, allow_unused=True
        )
    if (
        keep
        and not passed_in
        and not reached_leaves([g for g in grads if g is not None], skip=made)[0]
    ):
        grads = tuple(None if g is None else g.detach() for g in grads)
    elif keep and stand_ins is not None:
        stand_ins.extend(made)
    return {
        k: torch.zeros_like(v) if g is None else g
        for (k, v), g in zip(inputs.items(), grads, strict=True)
    }


def adapt(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    inner: InnerLoop | None = None,
    *,
    inner_lr: InnerLR = UNSET,
    num_steps: int = UNSET,
    adapt_keys: KeySelector = UNSET,
    first_order: bool = UNSET,
    inner_optimizer: InnerOptimizer | None = UNSET,
) -> Params:
    """Adapt ``params`` to one task's support set; the last iterate of :func:`unroll`.

    Same arguments, guarantees and errors as :func:`unroll`.

    Returns:
        ``adapted``: ``{name: tensor}`` after ``num_steps`` inner steps.

    Example:
        >>> import torch
        >>> loss = lambda p, b: ((p["w"] - b[0]) ** 2).sum() / 2
        >>> adapt(loss, {"w": torch.zeros(1)}, (torch.ones(1), None), inner_lr=0.5)["w"]
        tensor([0.5000])
    """
    return unroll(
        loss_fn,
        params,
        support,
        inner,
        inner_lr=inner_lr,
        num_steps=num_steps,
        adapt_keys=adapt_keys,
        first_order=first_order,
        inner_optimizer=inner_optimizer,
    )[-1]


def at_step(loss_fn: LossFn, step: int, support: Batch | Tensor | None = None) -> LossFn:
    """``loss_fn`` for the forward pass after ``step`` inner steps.

    A *stepwise* loss (its :class:`fmaml.types.LossOptions` say so, e.g. per-step BatchNorm
    from :func:`fmaml.per_step`) is given the step; a loss with ``support_statistics`` is given
    the task's support set to take its BatchNorm statistics from (for query batches): its
    ``x``, or the whole set when it is padded (``(x, y, mask[, classes])``: the mask must
    reach the statistics). ``support`` is the support set (or, as before, its ``x`` alone,
    for unpadded tasks). Any other loss is returned as it is.
    """
    kwargs: dict = {}
    options = options_of(loss_fn)
    if options.stepwise:
        kwargs["step"] = step
    if support is not None and options.support_statistics:
        plain = isinstance(support, (tuple, list)) and not is_padded(support)
        kwargs["stats_from"] = support[0] if plain else support
    return functools.partial(loss_fn, **kwargs) if kwargs else loss_fn


def step_rates(
    inner_lr: InnerLR,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    num_steps: int,
    *,
    caller: str = "adapt",
) -> list[Mapping[str, float | Tensor]]:
    """Normalise ``inner_lr`` to one ``{name: rate}`` per step, checking its structure.

    Raises:
        ValueError: for a sequence of the wrong length, rate-dict keys that differ from
            ``names``, or a rate whose shape is neither ``[]`` nor the parameter's.
        TypeError: for a rate that is not a number, tensor or dict.
    """
    if isinstance(inner_lr, Sequence) and not isinstance(inner_lr, str):
        if len(inner_lr) != num_steps:
            raise ValueError(
                f"{caller}(): `inner_lr` is a sequence of {len(inner_lr)} per-step rates but "
                f"`num_steps` is {num_steps}. Give one rate per inner step, or a single rate."
            )
        per_step = list(inner_lr)
    else:
        per_step = [inner_lr] * num_steps
    return [_rate_dict(rate, params, names, caller) for rate in per_step]


def _rate_dict(rate: Rate, params, names, caller: str) -> Mapping[str, float | Tensor]:
    if isinstance(rate, numbers.Real) or (isinstance(rate, Tensor) and rate.dim() == 0):
        return dict.fromkeys(names, rate)
    if isinstance(rate, Tensor):
        raise ValueError(
            f"{caller}(): a tensor `inner_lr` must be 0-d, got shape {list(rate.shape)}. "
            "For per-parameter rates pass a dict {name: tensor} (see fmaml.init_rates)."
        )
    if not isinstance(rate, Mapping):
        raise TypeError(
            f"{caller}(): `inner_lr` must be a number, a 0-d tensor, a dict of tensors or a "
            f"sequence of those, got {type(rate).__name__}."
        )
    missing = [k for k in names if k not in rate]
    unexpected = [k for k in rate if k not in set(names)]
    if missing or unexpected:
        raise ValueError(
            f"{caller}(): `inner_lr` is a dict but its keys don't match the adapted parameters.\n"
            f"  missing:    {missing}\n"
            f"  unexpected: {unexpected}\n"
            "Build the rates from the same partition as `adapt_keys` (fmaml.init_rates)."
        )
    for k in names:
        shape = tuple(rate[k].shape)
        if shape not in ((), tuple(params[k].shape)):
            raise ValueError(
                f"{caller}(): `inner_lr[{k!r}]` has shape {list(shape)}; expected [] or the "
                f"parameter's shape {list(params[k].shape)}. Build the rates with fmaml.init_rates."
            )
    return rate


def _check_num_steps(num_steps: int, caller: str) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(
            f"{caller}(): `num_steps` must be a positive integer, got {num_steps!r}. "
            "Use num_steps=1 or more inner gradient steps."
        )


def init_rates(
    params: Mapping[str, Tensor],
    inner_lr: float,
    *,
    adapt_keys: KeySelector = None,
    per_element: bool = True,
    num_steps: int | None = None,
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """Learnable inner learning rates initialised to ``inner_lr``.

    ``per_element=True`` gives Meta-SGD's rates (Li et al. 2017): one rate per parameter
    element, shaped like the parameter. ``per_element=False`` gives one 0-d rate per
    parameter tensor; with ``num_steps`` set, a list of such dicts, one per step (MAML++ LSLR,
    Antoniou et al. 2019).

    Args:
        params: ``{name: tensor}``; the rates cover the names ``adapt_keys`` selects.
        inner_lr: the initial rate.
        adapt_keys: which parameters are adapted (as in :func:`adapt`).
        per_element: rates shaped like the parameters (True) or 0-d (False).
        num_steps: if given, return a list of ``num_steps`` independent rate dicts.

    Returns:
        ``{name: tensor}`` of leaves that require grad, or a list of them.

    Example:
        >>> import torch
        >>> rates = init_rates({"w": torch.zeros(2, 3)}, 0.1)
        >>> rates["w"].shape, rates["w"].requires_grad
        (torch.Size([2, 3]), True)
    """
    names = select(params.keys(), adapt_keys, caller="init_rates")

    def one() -> dict[str, Tensor]:
        return {
            k: torch.full(
                params[k].shape if per_element else (),
                float(inner_lr),
                dtype=params[k].dtype,
                device=params[k].device,
                requires_grad=True,
            )
            for k in names
        }

    if num_steps is None:
        return one()
    _check_num_steps(num_steps, "init_rates")
    return [one() for _ in range(num_steps)]
