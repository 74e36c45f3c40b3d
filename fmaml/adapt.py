"""The inner loop: gradient steps on one task's support set, as a pure function.

One function takes an inner step (:func:`inner_step`) and one runs the loop
(:func:`trajectory`), with every :class:`fmaml.InnerLoop` field: rates, steps, adapted keys,
order, inner optimiser and prototype head. :func:`unroll` returns every iterate and
:func:`adapt` the last. Both are written for one task (no task axis); :func:`fmaml.meta_loss`
vmaps them over a meta-batch.

How a step is computed is an explicit argument, never a setting of the definition: ``grad``
(:func:`func_grad`, ``torch.func.grad``, works under every transform; :func:`autograd_grad`,
plain ``torch.autograd.grad``, with less overhead per op, for one task at a time outside any
transform) and ``call`` (how each piece of the loop is run: :func:`direct` by default; the
engine passes one that recomputes a piece in the backward instead of storing it). Every path
runs this one loop.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fmaml.errors import public
from fmaml.inner_loop import InnerLoop, InnerLR, Rate, check_inner
from fmaml.inner_optim import State, check_inner_optimizer
from fmaml.padding import is_padded
from fmaml.proto import HEAD_KEYS, check_head, check_support_labels, prototype_head
from fmaml.tree import KeySelector, select
from fmaml.types import Batch, LossFn, Params, options_of

Grad = Callable[[Params, LossFn, Params, Batch, bool], Params]
"""``grad(fast, loss_fn, frozen, support, first_order) -> {name: gradient}``: the support
loss's gradient with respect to the adapted parameters ``fast`` (constants if
``first_order``)."""

Call = Callable[..., Any]
"""``call(piece, carry, data, shared) -> piece(carry, data)``: how the loop runs each of its
pieces (the head, a step, a query loss). ``shared``: ``carry`` is the meta-parameters, the
same for every task, rather than one task's."""


def func_grad(fast: Params, loss_fn: LossFn, frozen: Params, support: Batch, first_order: bool):
    """The inner gradient by ``torch.func.grad``: the definition's, valid under every
    ``torch.func`` transform and differentiable any number of times."""
    grads = torch.func.grad(support_loss)(fast, loss_fn, frozen, support)
    return {k: g.detach() for k, g in grads.items()} if first_order else grads


def autograd_grad(
    fast: Params, loss_fn: LossFn, frozen: Params, support: Batch, first_order: bool
) -> Params:
    """The same gradient by plain ``torch.autograd.grad``: the same values and graph with
    less overhead per op, for one task at a time outside any ``torch.func`` transform (the
    engine's choice there). With grad enabled and ``first_order=False`` the graph is kept,
    so tensors a ``loss_fn`` captures are differentiated through the step as under
    :func:`func_grad`; parameters that don't require grad get stand-in leaves (constants)."""
    keep = torch.is_grad_enabled() and not first_order
    tensors = [*fast.values(), *frozen.values(), *(t for t in support if isinstance(t, Tensor))]
    if keep and not any(t.requires_grad for t in tensors):
        # nothing passed in is differentiated: keep the graph only for a tensor the loss
        # captures (one more forward, in this rare case: evaluation with grad enabled)
        probe = support_loss({k: v.detach() for k, v in fast.items()}, loss_fn, frozen, support)
        keep = probe.requires_grad
    with torch.enable_grad():
        # A view, not ``v`` itself: the gradient is the one through the loss's use of
        # ``fast``, as torch.func.grad gives it, not also through a tensor the loss captures
        # that happens to be ``v`` (``params[k]`` in a regulariser).
        inputs = {
            k: v.view_as(v) if keep and v.requires_grad else v.detach().requires_grad_()
            for k, v in fast.items()
        }
        loss = support_loss(inputs, loss_fn, frozen, support)
        grads = torch.autograd.grad(
            loss, list(inputs.values()), create_graph=keep, allow_unused=True
        )
    return {
        k: torch.zeros_like(v) if g is None else g
        for (k, v), g in zip(inputs.items(), grads, strict=True)
    }


def direct(piece: Callable, carry: Any, data: Any, shared: bool = False) -> Any:
    """Run ``piece(carry, data)`` as it is: the definition's way of running the loop."""
    return piece(carry, data)


def support_loss(fast: Params, loss_fn: LossFn, frozen: Params, support: Batch) -> Tensor:
    """The support loss as a function of the adapted parameters alone (argument 0): what
    every inner step differentiates."""
    return loss_fn({**frozen, **fast}, support)


def inner_step(
    grads: Params, state: State, fast: Params, rate: Mapping[str, float | Tensor], inner: InnerLoop
) -> tuple[Params, State]:
    """One inner step from ``fast`` along ``grads``: the one step every path takes.

    Plain SGD (``inner.inner_optimizer`` is ``None``) is ``fast - rate * grads`` with state
    ``{}``; an inner optimiser starts from ``init(fast)`` when ``state`` is empty.

    Returns:
        ``(fast, state)`` after the step, new dicts.
    """
    optimizer = inner.inner_optimizer
    if optimizer is None:
        return {k: fast[k] - rate[k] * grads[k] for k in fast}, {}
    return optimizer.update(grads, state or optimizer.init(fast), fast, rate, optimizer.hyper)


class Trajectory(NamedTuple):
    """The inner loop's iterates of one task: ``fast[s]`` after ``s`` steps (the adapted
    parameters) and ``frozen`` (those held fixed, with a prototype head if it is not
    adapted); ``shared[s]``: ``fast[s]`` is still the meta-parameters themselves."""

    frozen: Params
    fast: list[Params]
    shared: list[bool]
    order: tuple[str, ...]

    def params(self, step: int) -> Params:
        """Every parameter after ``step`` steps, in the order of the meta-parameters."""
        both = {**self.frozen, **self.fast[step]}
        return {k: both[k] for k in self.order}


def trajectory(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    inner: InnerLoop,
    *,
    grad: Grad = func_grad,
    call: Call = direct,
) -> Trajectory:
    """The inner loop: the one function that runs it, for every path. See :func:`unroll`.

    ``grad`` and ``call`` choose how each step is computed (see the module's docstring);
    the defaults are the definition.
    """
    check_inner(inner)
    num_steps = inner.num_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        num_steps = -1  # refused below
    if num_steps < (0 if inner.head_init is not None else 1):
        raise ValueError(
            f"unroll(): `num_steps` must be a positive integer (0 only with "
            f"head_init='prototypes': ProtoNet), got {inner.num_steps!r}. Use num_steps=1 or "
            "more inner gradient steps."
        )
    check_inner_optimizer(inner.inner_optimizer, "unroll")
    names = select(params.keys(), inner.adapt_keys, caller="unroll")
    rates = step_rates(inner.inner_lr, params, names, num_steps) if num_steps else []
    frozen = {k: v for k, v in params.items() if k not in set(names)}
    fast = {k: params[k] for k in names}
    shared = True
    if inner.head_init is not None:
        _check_prototype_head(loss_fn, params, support, inner.head_init)

        def head(fast: Params, support: Batch) -> tuple[Params, Params]:
            start = prototype_head(loss_fn, {**frozen, **fast}, support)
            return {k: start[k] for k in fast}, {k: start[k] for k in HEAD_KEYS if k in frozen}

        fast, frozen_head = call(head, fast, support, shared)
        frozen, shared = {**frozen, **frozen_head}, False
    fasts, shares, state = [fast], [shared], {}
    for s, rate in enumerate(rates):

        def step(carry: tuple, support: Batch, s=s, rate=rate) -> tuple[Params, State]:
            fast, state = carry
            grads = grad(fast, at_step(loss_fn, s), frozen, support, inner.first_order)
            return inner_step(grads, state, fast, rate, inner)

        fast, state = call(step, (fast, state), support, shared)
        shared = False
        fasts.append(fast)
        shares.append(shared)
    return Trajectory(frozen, fasts, shares, tuple(params))


@public
def unroll(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    inner: InnerLoop,
) -> list[Params]:
    r"""Run ``inner.num_steps`` of gradient descent on the support loss; return every iterate.

    .. math:: \theta_{s+1} = \theta_s - \alpha_s \odot \nabla_\theta L(\theta_s; \text{support})

    (or another optimiser's step on the same gradient, with ``inner.inner_optimizer``)

    Pure: builds new dicts, never changes ``params``. Differentiable with respect to
    ``params`` and to any tensor in ``inner``: the result carries the full second-order
    graph (MAML). With ``first_order=True`` the inner gradients are treated as constants
    (first-order MAML, Finn et al. 2017, section 5.2). Parameters outside ``adapt_keys`` are
    held fixed in the inner loop (ANIL, Raghu et al. 2020; BOIL, Oh et al. 2021) but still
    receive meta-gradients. With ``head_init="prototypes"`` the linear head starts from the
    support set's class prototypes (:func:`fmaml.prototype_head`; ProtoMAML), and
    ``num_steps=0`` is allowed (ProtoNet).

    Args:
        loss_fn: ``loss_fn(params, (x, y)) -> scalar``, e.g. :func:`fmaml.supervised_loss`.
        params: ``{name: tensor}``, the starting point (meta-parameters).
        support: ``(x, y)`` of one task, ``x: [num_support, *feature]``.
        inner: the settings, one :class:`fmaml.InnerLoop` (its ``step_weights`` do not
            matter here).

    Returns:
        ``[params, adapted_1, ..., adapted_num_steps]``: ``num_steps + 1`` dicts with the keys of
        ``params`` in the same order (the first with the prototype head, if any).

    Raises:
        ValueError: ``num_steps`` below 1 (below 0 with a prototype head); ``adapt_keys``
            empty or naming unknown parameters; rate dicts whose keys or shapes do not
            match the adapted parameters; a rate sequence whose length is not
            ``num_steps``; a hyper-parameter tensor of the inner optimiser that is not 0-d;
            with a prototype head, what :func:`fmaml.prototype_head` raises.
        TypeError: ``inner`` not an :class:`fmaml.InnerLoop`; an inner optimiser that is not
            an :class:`fmaml.inner_optim.InnerOptimizer`.

    Example:
        >>> import torch, fmaml
        >>> loss = lambda p, b: ((p["w"] - b[0]) ** 2).sum() / 2
        >>> steps = unroll(loss, {"w": torch.zeros(2)}, (torch.ones(2), None),
        ...                fmaml.InnerLoop(0.5, num_steps=2))
        >>> [s["w"].tolist() for s in steps]
        [[0.0, 0.0], [0.5, 0.5], [0.75, 0.75]]
    """
    iterates = trajectory(loss_fn, params, support, inner)
    return [iterates.params(s) for s in range(len(iterates.fast))]


@public
def adapt(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    inner: InnerLoop,
) -> Params:
    """Adapt ``params`` to one task's support set; the last iterate of :func:`unroll`.

    Same arguments, guarantees and errors as :func:`unroll`.

    Returns:
        ``adapted``: ``{name: tensor}`` after ``inner.num_steps`` inner steps.

    Example:
        >>> import torch, fmaml
        >>> loss = lambda p, b: ((p["w"] - b[0]) ** 2).sum() / 2
        >>> adapt(loss, {"w": torch.zeros(1)}, (torch.ones(1), None), fmaml.InnerLoop(0.5))["w"]
        tensor([0.5000])
    """
    iterates = trajectory(loss_fn, params, support, inner)
    return iterates.params(len(iterates.fast) - 1)


def _check_prototype_head(loss_fn, params, support, head_init) -> None:
    """The settings of a prototype head checked (labels too, where they can be read: outside
    ``vmap``)."""
    if head_init != "prototypes":
        raise ValueError(
            f"unroll(): `head_init` must be None (the meta-learned head) or 'prototypes' "
            f"(ProtoMAML/ProtoNet), got {head_init!r}."
        )
    if is_padded(support):
        raise ValueError(
            "unroll(): head_init='prototypes' averages every support example of a class, "
            "but the support set is padded (x, y, mask): padded rows would enter the "
            "prototypes. Use head_init=None with padded tasks, or tasks of one shape."
        )
    num_ways, _ = check_head(loss_fn, params, "unroll")
    check_support_labels(support[1], num_ways, "unroll")  # values: skipped under vmap


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
                f"unroll(): `inner_lr` is a sequence of {len(inner_lr)} per-step rates but "
                f"`num_steps` is {num_steps}. Give one rate per inner step, or a single rate."
            )
        per_step = list(inner_lr)
    else:
        per_step = [inner_lr] * num_steps
    return [_rate_dict(rate, params, names) for rate in per_step]


def _rate_dict(rate: Rate, params, names) -> Mapping[str, float | Tensor]:
    if isinstance(rate, numbers.Real) or (isinstance(rate, Tensor) and rate.dim() == 0):
        return dict.fromkeys(names, rate)
    if isinstance(rate, Tensor):
        raise ValueError(
            f"unroll(): a tensor `inner_lr` must be 0-d, got shape {list(rate.shape)}. "
            "For per-parameter rates pass a dict {name: tensor} (see fmaml.init_rates)."
        )
    if not isinstance(rate, Mapping):
        raise TypeError(
            f"unroll(): `inner_lr` must be a number, a 0-d tensor, a dict of tensors or a "
            f"sequence of those, got {type(rate).__name__}."
        )
    missing = [k for k in names if k not in rate]
    unexpected = [k for k in rate if k not in set(names)]
    if missing or unexpected:
        raise ValueError(
            f"unroll(): `inner_lr` is a dict but its keys don't match the adapted parameters.\n"
            f"  missing:    {missing}\n"
            f"  unexpected: {unexpected}\n"
            "Build the rates from the same partition as `adapt_keys` (fmaml.init_rates)."
        )
    for k in names:
        shape = tuple(rate[k].shape)
        if shape not in ((), tuple(params[k].shape)):
            raise ValueError(
                f"unroll(): `inner_lr[{k!r}]` has shape {list(shape)}; expected [] or the "
                f"parameter's shape {list(params[k].shape)}. Build the rates with fmaml.init_rates."
            )
    return rate


@public
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
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(
            f"init_rates(): `num_steps` must be a positive integer, got {num_steps!r}."
        )
    return [one() for _ in range(num_steps)]
