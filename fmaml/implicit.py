"""iMAML: the implicit meta-gradient of a regularised inner problem, for one task.

``imaml_loss`` sees one task; :func:`fmaml.meta_loss` with ``objective=IMAML(...)`` (or
``"imaml"``) is the one vmap over the task axis. No inner step is differentiated: the
meta-gradient comes from a conjugate-gradient solve with Hessian-vector products at the
adapted parameters, so its memory does not grow with ``num_steps``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fmaml.adapt import adapt, at_step
from fmaml.errors import public
from fmaml.inner_loop import InnerLoop, check_inner
from fmaml.inner_optim import proximal
from fmaml.tree import select, tensors_in
from fmaml.types import LossFn, Params, Task, options_of


@dataclass(frozen=True)
class IMAML:
    r"""iMAML's settings: the strength of the pull towards ``params`` and the CG iterations.

    Pass it as ``objective=`` to :func:`fmaml.meta_loss` or :func:`fmaml.task_loss`
    (``objective="imaml"`` is ``IMAML()``); change one field with ``dataclasses.replace``.

    Args:
        lam: :math:`\lambda > 0` in the inner problem
            :math:`\min_\phi L(\phi; \text{support}) + \frac{\lambda}{2}\lVert\phi -
            \theta\rVert^2`: large keeps ``adapted`` near ``params``.
        cg_steps: conjugate-gradient iterations (one Hessian-vector product each) solving
            :math:`(I + H/\lambda)\, g = \nabla_\phi L(\phi; \text{query})`, at least 1.

    Raises:
        ValueError: ``lam`` not a positive number, ``cg_steps`` not a positive integer.

    Example:
        >>> IMAML(lam=2.0).cg_steps
        5
    """

    lam: float = 1.0
    cg_steps: int = 5

    def __post_init__(self):
        lam = self.lam
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not lam > 0:
            raise ValueError(
                f"IMAML(): `lam` must be a positive number (the weight of "
                f"lam/2 ||adapted - params||^2 in the inner problem), got {lam!r}."
            )
        steps = self.cg_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"IMAML(): `cg_steps` must be a positive integer (conjugate-gradient "
                f"iterations), got {steps!r}."
            )


@public
def imaml_loss(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: Task,
    inner: InnerLoop,
    *,
    settings: IMAML = IMAML(),
    score_fn: LossFn | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""iMAML for one task: the query loss, whose gradient with respect to ``params`` is the
    implicit meta-gradient.

    The inner problem is regularised towards the meta-parameters :math:`\theta`:

    .. math:: \phi^\star(\theta) = \arg\min_\phi\, L_s(\phi) + \tfrac{\lambda}{2}
       \lVert \phi - \theta \rVert^2

    approximated by ``num_steps`` of gradient descent at ``inner_lr`` on that loss from
    :math:`\theta` (:func:`fmaml.adapt` with ``inner_optimizer=fmaml.inner_optim.proximal(lam)``,
    first-order: no inner step is kept). Adapt with that optimiser at test too: it is the
    inner problem the model was trained for (``cli.py`` does). At a minimum,
    :math:`d\phi^\star/d\theta = (I + H/\lambda)^{-1}` with :math:`H = \nabla^2 L_s(\phi)`,
    so the meta-gradient is

    .. math:: g = (I + H/\lambda)^{-1}\, \nabla_\phi L_q(\phi)

    solved by ``settings.cg_steps`` conjugate-gradient iterations from 0, each one
    Hessian-vector product (a ``torch.func.vjp`` of ``torch.func.grad`` of the support loss
    at :math:`\phi`, built once). Memory: the graph of one support gradient and one double
    backward, whatever ``num_steps`` (``benchmarks/imaml_memory.py``).

    With ``adapt_keys`` (ANIL-style) the keys outside it stay at ``params`` in the inner
    loop and receive the exact implicit gradient
    :math:`\partial_f L_q - M^\top g / \lambda`, where :math:`M = \partial_f \nabla_\phi
    L_s` (the mixed second derivative, one more vjp).

    Pure. Returns the query loss at the adapted parameters; its gradient with respect to
    ``params`` is :math:`g` (with everything else a constant: tensors ``loss_fn`` captures
    are refused). Differentiable once, in reverse mode: differentiating that gradient again
    (``create_graph=True`` and a second ``grad``, ``torch.func.hessian``, a jvp) raises
    ``RuntimeError``; so does a call under forward mode.

    Args:
        loss_fn: ``loss_fn(params, (x, y)) -> scalar``; the support loss of the inner
            problem and the query loss.
        params: ``{name: tensor}``, the meta-parameters :math:`\theta`.
        task: one :class:`fmaml.Task`, no task axis: ``support = (x [n_s, *feature],
            y [n_s, *target])``, ``query`` likewise.
        inner: the inner problem's ``inner_lr`` (no tensor of it may require grad),
            ``num_steps`` (at least 1) and ``adapt_keys``, one :class:`fmaml.InnerLoop`
            (its other fields at their defaults: iMAML takes no other optimiser, step
            weights, prototype head or first-order switch).
        settings: :class:`IMAML`, ``lam`` and ``cg_steps``.
        score_fn: if given, also return ``score_fn(adapted, query)`` (detached).

    Returns:
        A 0-d tensor; ``(loss, score)`` when ``score_fn`` is given.

    Raises:
        ValueError: ``inner_lr`` holds a tensor that requires grad (the implicit gradient
            does not depend on the inner rate: it would never be trained); a stepwise
            ``loss_fn`` (:func:`fmaml.per_step`); a ``loss_fn`` that uses a tensor requiring
            grad besides ``params``; everything :func:`fmaml.unroll` raises.
        RuntimeError: under forward-mode differentiation (``torch.func.jvp``, ``jacfwd``);
            and, from the backward, when the gradient is differentiated again.
        TypeError: ``settings`` is not an :class:`IMAML`.

    Example:
        >>> import torch, fmaml
        >>> loss = lambda p, b: ((p["w"] - b[0]) ** 2).sum() / 2  # H = I
        >>> params = {"w": torch.zeros(2, dtype=torch.float64, requires_grad=True)}
        >>> one = torch.ones(2, dtype=torch.float64)
        >>> task = fmaml.Task(support=(one, None), query=(2 * one, None))
        >>> ell = imaml_loss(loss, params, task, fmaml.InnerLoop(0.5, num_steps=40),
        ...                  settings=IMAML(lam=1.0, cg_steps=3))
        >>> torch.autograd.grad(ell, params["w"])[0]  # (I + I)^-1 (0.5 - 2)
        tensor([-0.7500, -0.7500], dtype=torch.float64)

    References:
        Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients",
        NeurIPS 2019.
    """
    loop = check_inner(inner)
    others = [
        k
        for k in ("first_order", "step_weights", "inner_optimizer", "head_init")
        if getattr(loop, k) is not None and getattr(loop, k) is not False
    ]
    if others:
        raise ValueError(
            f"imaml_loss(): the inner loop sets {sorted(others)}, but iMAML solves its "
            "regularised inner problem by plain gradient descent from params and "
            "differentiates no inner step. Use inner.replace("
            + ", ".join(f"{k}={'False' if k == 'first_order' else 'None'}" for k in sorted(others))
            + ")."
        )
    inner_lr, num_steps, adapt_keys = loop.inner_lr, loop.num_steps, loop.adapt_keys
    if not isinstance(settings, IMAML):
        raise TypeError(
            f"imaml_loss(): `settings` must be an fmaml.IMAML(lam=..., cg_steps=...), got "
            f"{type(settings).__name__}."
        )
    _refuse_learned_rates(inner_lr)
    if not torch.compiler.is_compiling():  # functorch's introspection: eager mode only
        _refuse_forward_mode(params)
    if options_of(loss_fn).stepwise:
        raise ValueError(
            "imaml_loss(): `loss_fn` is stepwise (fmaml.per_step: other weights after each "
            "inner step), but iMAML's inner problem is one loss whose Hessian at the solution "
            "gives the meta-gradient. Use the loss without per-step BatchNorm weights."
        )
    names = select(params.keys(), adapt_keys)
    lam = settings.lam
    start = {k: v.detach() for k, v in params.items()}
    adapted = adapt(
        loss_fn,
        start,
        task.support,
        InnerLoop(inner_lr, num_steps, names, first_order=True, inner_optimizer=proximal(lam)),
    )
    adapted = {k: v.detach() for k, v in adapted.items()}
    fast = {k: adapted[k] for k in names}
    frozen = {k: v for k, v in adapted.items() if k not in set(fast)}
    order = list(params)

    def merged(fast: Params, frozen: Params) -> Params:
        both = {**frozen, **fast}
        return {k: both[k] for k in order}

    query_fn = at_step(loss_fn, num_steps, task.support)

    def query_loss(fast: Params, frozen: Params) -> Tensor:
        return query_fn(merged(fast, frozen), task.query)

    score = None
    if score_fn is not None:
        with torch.no_grad():
            score = at_step(score_fn, num_steps, task.support)(adapted, task.query)
    if not torch.is_grad_enabled():  # evaluation: the value only
        value = query_loss(fast, frozen)
        return value if score is None else (value, score)
    (g_fast, g_frozen), value = torch.func.grad_and_value(query_loss, argnums=(0, 1))(fast, frozen)
    # (checked in eager mode; torch.compile can't trace functorch's introspection)
    if not torch.compiler.is_compiling() and _requires_grad(value):
        raise ValueError(
            "imaml_loss(): `loss_fn` uses a tensor that requires grad besides `params` (a "
            "tensor it captures, e.g. a learned temperature); iMAML's implicit gradient is "
            "computed for `params` only, so that tensor would get no gradient. Pass it in "
            "`params`, or detach it."
        )
    # torch.func's results can carry a graph at this level (the query pass's): keep none
    g_fast = {k: g.detach() for k, g in g_fast.items()}
    g_frozen = {k: g.detach() for k, g in g_frozen.items()}
    value = value.detach()

    def support_grad(fast: Params, frozen: Params) -> Params:
        return torch.func.grad(lambda f: loss_fn(merged(f, frozen), task.support))(fast)

    # Without grad at this level: the products are constants of the meta-loss. With grad,
    # each vjp's result carries an outer graph that the next iteration would chain onto
    # (memory growing with cg_steps). torch.func's own transforms still differentiate.
    with torch.no_grad():
        _, pull_back = torch.func.vjp(lambda f: support_grad(f, frozen), fast)
        g_fast = conjugate_gradient(lambda u: pull_back(u)[0], g_fast, lam, settings.cg_steps)
        if frozen:
            _, mixed = torch.func.vjp(lambda fr: support_grad(fast, fr), frozen)
            (m,) = mixed(g_fast)
            g_frozen = {k: g - m[k] / lam for k, g in g_frozen.items()}
    grads = {**g_frozen, **g_fast}
    loss = _Implicit.apply(
        value,
        len(order),
        *(grads[k] for k in order),
        *(params[k] for k in order),
    )
    return loss if score is None else (loss, score)


def conjugate_gradient(
    hvp: Callable[[Params], Params], b: Params, lam: float, num_steps: int
) -> Params:
    r"""``num_steps`` iterations of conjugate gradient from 0 on :math:`(I + H/\lambda)\,x = b`.

    Pure and vmappable: no data-dependent Python branch (a zero residual makes the step 0,
    not ``nan``).

    Args:
        hvp: ``u -> H u`` on dicts shaped like ``b`` (``H`` symmetric).
        b: ``{name: tensor}``, the right-hand side.
        lam: :math:`\lambda > 0`.
        num_steps: iterations; exact after as many as ``b`` has elements, in exact arithmetic,
            when :math:`I + H/\lambda` is positive definite.

    Returns:
        ``x``, a dict shaped like ``b``.

    Example:
        >>> import torch
        >>> b = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
        >>> conjugate_gradient(lambda u: {"w": 3 * u["w"]}, b, 1.0, 1)["w"]  # (1 + 3) x = b
        tensor([0.2500, 0.5000], dtype=torch.float64)
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rr = _dot(r, r)
    for _ in range(num_steps):
        hp = hvp(p)
        ap = {k: p[k] + hp[k] / lam for k in p}
        alpha = _safe_div(rr, _dot(p, ap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_next = _dot(r, r)
        beta = _safe_div(rr_next, rr)
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_next
    return x


def _requires_grad(t: Tensor) -> bool:
    """Whether ``t`` requires grad, looking through ``vmap``'s batching (a batched tensor
    reports ``False`` whatever it wraps; a structural check, safe under vmap)."""
    functorch = torch._C._functorch
    while functorch.is_batchedtensor(t):
        t = functorch.get_unwrapped(t)
    return t.requires_grad


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den`` is 0 (a solved system: nothing left to move)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)


def _refuse_learned_rates(inner_lr) -> None:
    if any(t.requires_grad for t in tensors_in(inner_lr)):
        raise ValueError(
            "imaml_loss(): `inner_lr` holds a tensor that requires grad, but iMAML's "
            "implicit meta-gradient depends only on where the inner problem ends (its "
            "minimum), not on the rate that gets there: the rate would never be trained. Pass "
            "a number or detached rates, or learn the rates with a query-loss algorithm "
            "(metasgd, or --lslr)."
        )


SECOND_DERIVATIVE = (
    "imaml_loss(): the iMAML loss is differentiable once, in reverse mode: its gradient is "
    "the implicit meta-gradient, solved by conjugate gradient and handed out as a constant, "
    "so it can't be differentiated {what}. Differentiate it once "
    "(torch.autograd.grad or .backward() without create_graph, or torch.func.grad), or use "
    "objective='query' (MAML, differentiable any number of times) for higher derivatives."
)


FORWARD_MODE = "in forward mode (jvp, jacfwd, torch.func.hessian)"


def _refuse_forward_mode(params: Mapping[str, Tensor]) -> None:
    """Raise under a forward-mode transform (``torch.func.jvp``, ``jacfwd``) or for dual
    ``params`` (``torch.autograd.forward_ad``): the implicit gradient is reverse-mode only."""
    from torch._C._functorch import TransformType
    from torch.autograd import forward_ad

    stack = torch._C._functorch.get_interpreter_stack() or []
    dual = forward_ad._current_level >= 0 and any(
        forward_ad.unpack_dual(t).tangent is not None for t in params.values()
    )
    if dual or any(i.key() == TransformType.Jvp for i in stack):
        raise RuntimeError(SECOND_DERIVATIVE.format(what=FORWARD_MODE))


class _Implicit(torch.autograd.Function):
    """``value``; its backward hands each of the ``count`` params the gradient given for it
    (``apply(value, count, *grads, *params)``).

    The gradient handed out is wrapped in :class:`_Refuse`: differentiating it (a second
    derivative) raises instead of silently giving zero. Works under ``vmap`` and
    ``torch.func.grad`` (``generate_vmap_rule``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value, count, *grads_then_params):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.count = inputs[1]
        ctx.save_for_backward(*inputs[2:])

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        grads, params = saved[: ctx.count], saved[ctx.count :]
        handed = (_Refuse.apply(grad_output * g, p) for g, p in zip(grads, params, strict=True))
        return (None, None, *(None for _ in grads), *handed)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(SECOND_DERIVATIVE.format(what=FORWARD_MODE))


class _Refuse(torch.autograd.Function):
    """The identity on a handed-out gradient, made to depend on its parameter so that a
    second derivative reaches this node and raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, param):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_output):
        raise RuntimeError(SECOND_DERIVATIVE.format(what="again (a second derivative)"))

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(SECOND_DERIVATIVE.format(what=FORWARD_MODE))
