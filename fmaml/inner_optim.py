r"""Inner-loop optimisers: SGD, SGD with momentum, Adam (and a proximal pull on any of them) as
pure functions of (params, state).

An :class:`InnerOptimizer` is a pair of pure functions, as optax's ``GradientTransformation``:
``init(params) -> state`` and ``update(grads, state, params, rate, hyper) -> (params, state)``,
plus the hyper-parameters ``hyper`` it is called with. :func:`fmaml.unroll` (and every
function above it) takes one through ``inner_optimizer=``; ``None`` is plain SGD, today's
inner step. The learning rate stays ``inner_lr`` in every form it has (a number, a 0-d tensor,
per-tensor or per-element dicts, one per step), so Meta-SGD with momentum is
``inner_lr=fmaml.init_rates(params, lr), inner_optimizer=momentum(0.9)``.

The hyper-parameters may be numbers or 0-d tensors; a tensor that requires grad is
meta-learned: the meta-gradient reaches it through every inner step (on every
:class:`fmaml.Strategy`). Keep a learned beta in (0, 1) by passing ``torch.sigmoid(logit)``
and learning ``logit`` (what ``cli.py train --learn-inner-hyper`` does).

Pure: ``update`` builds new dicts and never changes its arguments; under
:func:`torch.func.vmap` the state has the task axis its inputs have.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fmaml.types import Params

Hyper = Mapping[str, float | Tensor]
"""Hyper-parameters besides the rate: ``{name: number or 0-d tensor}``."""

State = Mapping[str, Any]
"""An inner optimiser's state: a dict of tensors and dicts of tensors (no Python numbers,
so that ``vmap`` can carry it)."""


class InnerOptimizer(NamedTuple):
    """An inner-loop optimiser: pure ``init``/``update`` and the hyper-parameters to use.

    Attributes:
        init: ``init(params) -> state`` for ``params: {name: tensor}`` (the adapted ones).
        update: ``update(grads, state, params, rate, hyper) -> (params, state)``: one step;
            ``grads`` and ``params`` are ``{name: tensor}`` with the same keys, ``rate`` is
            ``{name: number or tensor}`` (each ``[]`` or the parameter's shape), ``hyper``
            is :attr:`hyper` (passed in, so that a strategy can hand in its own copy).
        hyper: ``{name: number or 0-d tensor}``; tensors that require grad are meta-learned.

    A variant is this value with a field changed: ``adam()._replace(hyper={...})``.
    """

    init: Callable[[Params], State]
    update: Callable[..., tuple[Params, State]]
    hyper: Hyper = {}  # noqa: RUF012 (a NamedTuple default: never changed)


# --- SGD -----------------------------------------------------------------------------------------


def _sgd_init(params: Params) -> State:
    return {}


def _sgd_update(grads, state, params, rate, hyper):
    return {k: params[k] - rate[k] * grads[k] for k in params}, state


def sgd() -> InnerOptimizer:
    r"""Plain gradient descent: :math:`\theta \leftarrow \theta - \alpha \odot g`.

    The same step, in the same arithmetic, as ``inner_optimizer=None``: kept so that the
    three optimisers can be named alike (``cli.py train --inner-optimizer sgd``).

    Returns:
        An :class:`InnerOptimizer` with no state and no hyper-parameters.

    Example:
        >>> import torch
        >>> opt = sgd()
        >>> p, _ = opt.update({"w": torch.ones(2)}, opt.init({}), {"w": torch.zeros(2)},
        ...                   {"w": 0.5}, opt.hyper)
        >>> p["w"]
        tensor([-0.5000, -0.5000])
    """
    return InnerOptimizer(_sgd_init, _sgd_update, {})


# --- momentum ------------------------------------------------------------------------------------


def _momentum_init(params: Params) -> State:
    return {"velocity": {k: torch.zeros_like(v) for k, v in params.items()}}


def _momentum_update(grads, state, params, rate, hyper):
    beta = hyper["beta"]
    velocity = {k: beta * state["velocity"][k] + grads[k] for k in params}
    return {k: params[k] - rate[k] * velocity[k] for k in params}, {"velocity": velocity}


def momentum(beta: float | Tensor = 0.9) -> InnerOptimizer:
    r"""Gradient descent with (heavy-ball) momentum, as ``torch.optim.SGD(momentum=beta)``.

    .. math:: v_{s+1} = \beta v_s + g_s, \qquad \theta_{s+1} = \theta_s - \alpha_s \odot
       v_{s+1}, \qquad v_0 = 0

    Pure; differentiable in the parameters, the rates and ``beta``. ``beta=0`` is SGD exactly
    (the same floating-point numbers).

    Args:
        beta: the momentum, a number in [0, 1) or a 0-d tensor (learned if it requires grad;
            keep it in (0, 1) with ``torch.sigmoid(logit)``).

    Returns:
        An :class:`InnerOptimizer`; its state is ``{"velocity": {name: tensor}}``.

    Raises:
        ValueError: ``beta`` a number outside [0, 1), or a tensor that is not 0-d.
        TypeError: ``beta`` neither a number nor a floating-point tensor.

    Example:
        >>> import torch
        >>> opt = momentum(0.5)
        >>> params, grads = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     params, state = opt.update(grads, state, params, {"w": 1.0}, opt.hyper)
        >>> params["w"]  # -1, then -1 - 1.5
        tensor([-2.5000])
    """
    return InnerOptimizer(
        _momentum_init, _momentum_update, {"beta": _check_unit("momentum", "beta", beta)}
    )


# --- Adam ----------------------------------------------------------------------------------------


def _adam_init(params: Params) -> State:
    first = next(iter(params.values()))
    return {
        "count": torch.zeros((), dtype=first.dtype, device=first.device),
        "mu": {k: torch.zeros_like(v) for k, v in params.items()},
        "nu": {k: torch.zeros_like(v) for k, v in params.items()},
    }


def _adam_update(grads, state, params, rate, hyper):
    beta1, beta2, eps = hyper["beta1"], hyper["beta2"], hyper["eps"]
    count = state["count"] + 1
    mu = {k: beta1 * state["mu"][k] + (1 - beta1) * grads[k] for k in params}
    nu = {k: beta2 * state["nu"][k] + (1 - beta2) * grads[k] * grads[k] for k in params}
    correction1, correction2 = 1 - beta1**count, 1 - beta2**count
    adapted = {
        k: params[k] - rate[k] * (mu[k] / correction1) / (_sqrt(nu[k] / correction2) + eps)
        for k in params
    }
    return adapted, {"count": count, "mu": mu, "nu": nu}


def _sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0 instead of infinite.

    Adam's second moment is 0 where every gradient so far was 0 (a dead ReLU); there the
    derivative of ``sqrt`` is infinite and the chain rule multiplies it by the derivative of
    ``g * g``, 0, giving NaN. The step ``m / (sqrt(v) + eps)`` has a finite derivative there,
    which this gives: the ``sqrt`` term's share of it is 0 in the limit.
    """
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), 0.0)


def adam(
    beta1: float | Tensor = 0.9, beta2: float | Tensor = 0.999, eps: float | Tensor = 1e-8
) -> InnerOptimizer:
    r"""Adam (Kingma & Ba, ICLR 2015) in the inner loop, as ``torch.optim.Adam``.

    .. math:: m_{s+1} = \beta_1 m_s + (1-\beta_1) g_s, \quad
       v_{s+1} = \beta_2 v_s + (1-\beta_2) g_s^2, \quad
       \theta_{s+1} = \theta_s - \alpha_s \odot
       \frac{m_{s+1} / (1-\beta_1^{s+1})}{\sqrt{v_{s+1} / (1-\beta_2^{s+1})} + \epsilon}

    with :math:`m_0 = v_0 = 0`. The first step is :math:`\alpha\, g / (|g| + \epsilon)`,
    about :math:`\alpha\,\mathrm{sign}(g)`. Pure; differentiable in the parameters, the rates
    and the hyper-parameters, including where a gradient is exactly 0 (see ``_sqrt``).
    Second-order meta-gradients go through :math:`g / (|g| + \epsilon)`, whose derivative
    near :math:`g = 0` is up to :math:`1/\epsilon`: a larger ``eps`` (1e-4) keeps them
    tame. Reptile's few-shot runs used Adam with ``beta1=0`` in the inner loop.

    Args:
        beta1, beta2: decay of the first and second moments: numbers in [0, 1), or 0-d
            tensors (learned if they require grad; keep them in (0, 1) with
            ``torch.sigmoid(logit)``).
        eps: added to the denominator: a positive number or a 0-d tensor.

    Returns:
        An :class:`InnerOptimizer`; its state is ``{"count": [], "mu": {name: tensor},
        "nu": {name: tensor}}`` (``count``, the steps taken, a 0-d float tensor).

    Raises:
        ValueError: a beta outside [0, 1) or ``eps`` not positive (numbers), a tensor
            that is not 0-d.
        TypeError: a hyper-parameter neither a number nor a floating-point tensor.

    Example:
        >>> import torch
        >>> opt = adam()
        >>> params = {"w": torch.zeros(2)}
        >>> adapted, state = opt.update({"w": torch.tensor([3.0, -0.5])}, opt.init(params),
        ...                             params, {"w": 0.1}, opt.hyper)
        >>> adapted["w"]  # -0.1 * sign(g)
        tensor([-0.1000,  0.1000])

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """
    hyper = {
        "beta1": _check_unit("adam", "beta1", beta1),
        "beta2": _check_unit("adam", "beta2", beta2),
        "eps": _check_hyper("adam", "eps", eps),
    }
    if isinstance(eps, numbers.Real) and not eps > 0:
        raise ValueError(f"adam(): `eps` must be positive, got {eps!r}. The default is 1e-8.")
    return InnerOptimizer(_adam_init, _adam_update, hyper)


# --- proximal ------------------------------------------------------------------------------------


def _proximal_init(base: InnerOptimizer) -> Callable[[Params], State]:
    def init(params: Params) -> State:
        return {"anchor": dict(params), "base": base.init(params)}

    return init


def _proximal_update(base: InnerOptimizer) -> Callable[..., tuple[Params, State]]:
    def update(grads, state, params, rate, hyper):
        lam, anchor = hyper["lam"], state["anchor"]
        pulled = {k: grads[k] + lam * (params[k] - anchor[k]) for k in params}
        adapted, inner = base.update(pulled, state["base"], params, rate, hyper)
        return adapted, {"anchor": anchor, "base": inner}

    return update


def proximal(lam: float | Tensor, base: InnerOptimizer | None = None) -> InnerOptimizer:
    r"""``base`` on the support loss plus :math:`\tfrac{\lambda}{2}\lVert\phi - \phi_0
    \rVert^2`, a pull towards where the inner loop started: iMAML's inner problem.

    .. math:: g_s \leftarrow g_s + \lambda (\phi_s - \phi_0)

    then one step of ``base`` (plain SGD by default) along it. :math:`\phi_0` is the
    parameters the inner loop starts from (the meta-parameters), kept in the state; a
    second-order meta-gradient goes through it too. ``lam=0`` is ``base`` exactly.
    ``cli.py`` adapts an ``--algorithm imaml`` model with it at validation and test, so that
    the model is tested on the inner problem it was trained for (:func:`fmaml.imaml_loss`).

    Args:
        lam: :math:`\lambda \ge 0`, a number or a 0-d tensor.
        base: the optimiser that takes the step (``None``: :func:`sgd`); its
            hyper-parameters are kept beside ``lam``.

    Returns:
        An :class:`InnerOptimizer`; its state is ``{"anchor": {name: tensor}, "base":
        base's state}`` and its hyper-parameters ``{"lam": lam, **base.hyper}``.

    Raises:
        ValueError: ``lam`` a negative number, or a tensor that is not 0-d.
        TypeError: ``lam`` neither a number nor a floating-point tensor; ``base`` not an
            :class:`InnerOptimizer`, or one that already has a ``lam``.

    Example:
        >>> import torch
        >>> opt = proximal(1.0)
        >>> params = {"w": torch.zeros(1)}
        >>> state = opt.init(params)
        >>> for _ in range(2):  # gradient 1 everywhere, pulled back to 0
        ...     params, state = opt.update({"w": torch.ones(1)}, state, params, {"w": 0.5},
        ...                                opt.hyper)
        >>> params["w"]  # -0.5, then -0.5 - 0.5 * (1 - 0.5)
        tensor([-0.7500])
    """
    base = sgd() if base is None else base
    if not isinstance(base, InnerOptimizer) or "lam" in base.hyper:
        raise TypeError(
            "proximal(): `base` must be an fmaml.inner_optim.InnerOptimizer without a `lam` "
            f"(sgd(), momentum(beta), adam(...)), got {type(base).__name__}."
        )
    lam = _check_hyper("proximal", "lam", lam)
    if isinstance(lam, numbers.Real) and not lam >= 0:  # NaN too
        raise ValueError(f"proximal(): `lam` must be >= 0, got {lam!r}.")
    return InnerOptimizer(_proximal_init(base), _proximal_update(base), {"lam": lam, **base.hyper})


# --- by name -------------------------------------------------------------------------------------

INNER_OPTIMIZERS: dict[str, Callable[..., InnerOptimizer]] = {
    "sgd": sgd,
    "momentum": momentum,
    "adam": adam,
}
"""The inner optimisers by name (``cli.py train --inner-optimizer``)."""


def get_inner_optimizer(name: str, **hyper: float | Tensor) -> InnerOptimizer:
    """The inner optimiser called ``name`` with these hyper-parameters (others default).

    Raises:
        ValueError: an unknown name, or a hyper-parameter the optimiser does not take
            (both listing what it knows), and what the optimiser itself raises.

    Example:
        >>> get_inner_optimizer("momentum", beta=0.5).hyper
        {'beta': 0.5}
    """
    if name not in INNER_OPTIMIZERS:
        raise ValueError(
            f"get_inner_optimizer(): unknown inner optimiser {name!r}; expected one of "
            f"{sorted(INNER_OPTIMIZERS)}."
        )
    make = INNER_OPTIMIZERS[name]
    known = list(hyper_names(name))
    unknown = sorted(set(hyper) - set(known))
    if unknown:
        raise ValueError(
            f"get_inner_optimizer(): {name} has no hyper-parameter "
            f"{', '.join(map(repr, unknown))}; it takes {known or 'none'}."
        )
    return make(**hyper)


def hyper_names(name: str) -> dict[str, float]:
    """The hyper-parameters of the inner optimiser ``name`` and their defaults."""
    return {
        p.name: p.default for p in inspect.signature(INNER_OPTIMIZERS[name]).parameters.values()
    }


def check_inner_optimizer(inner_optimizer, caller: str) -> InnerOptimizer | None:
    """``inner_optimizer`` if it is ``None`` or an :class:`InnerOptimizer` whose
    hyper-parameters are numbers or 0-d tensors (structure only: safe under ``vmap``).

    Raises:
        TypeError: anything else (a name: build the optimiser from it first).
        ValueError: a hyper-parameter tensor that is not 0-d.
    """
    if inner_optimizer is None:
        return None
    if not isinstance(inner_optimizer, InnerOptimizer):
        hint = (
            f" Build it: fmaml.inner_optim.get_inner_optimizer({inner_optimizer!r})."
            if isinstance(inner_optimizer, str)
            else ""
        )
        raise TypeError(
            f"{caller}(): `inner_optimizer` must be an fmaml.inner_optim.InnerOptimizer "
            f"(sgd(), momentum(beta), adam(...)) or None for plain SGD, got "
            f"{type(inner_optimizer).__name__}.{hint}"
        )
    for name, value in inner_optimizer.hyper.items():
        _check_hyper(caller, name, value)
    return inner_optimizer


def _check_hyper(caller: str, name: str, value):
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(
                f"{caller}(): the hyper-parameter `{name}` must be a number or a 0-d "
                f"floating-point tensor, got a tensor of shape {list(value.shape)} and "
                f"dtype {value.dtype}."
            )
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{caller}(): the hyper-parameter `{name}` must be a number or a 0-d tensor, got "
            f"{type(value).__name__}."
        )
    return value


def _check_unit(caller: str, name: str, value):
    """A number in [0, 1), or a 0-d tensor (its value is the caller's: learned ones change)."""
    value = _check_hyper(caller, name, value)
    if isinstance(value, numbers.Real) and not 0 <= value < 1:
        raise ValueError(
            f"{caller}(): `{name}` must be in [0, 1), got {value!r}. To learn it, pass "
            "torch.sigmoid(logit) for a logit tensor that requires grad."
        )
    return value
