"""The inner loop's settings as one immutable value.

Rates, steps, which parameters adapt, the order of the meta-gradient, the weights of the
query loss after each step, the inner optimiser and the head's starting point travel
together as one :class:`InnerLoop`; a variant is that value with a field changed::

    maml = InnerLoop(0.4)             # inner_lr, positional; the rest keep their defaults
    fomaml = maml.replace(first_order=True)
    anil = maml.replace(adapt_keys=fmaml.algorithms.head_keys)

Every function that runs an inner loop (:func:`fmaml.unroll`, :func:`fmaml.adapt`,
:func:`fmaml.task_loss`, :func:`fmaml.meta_loss`, :func:`fmaml.value_and_grad`,
:func:`fmaml.evaluate`, ...) takes it as its fourth argument, ``inner``; no other signature
repeats its fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

from torch import Tensor

from fmaml.inner_optim import InnerOptimizer
from fmaml.tree import KeySelector

Rate = float | Tensor | Mapping[str, Tensor]
"""One step's inner learning rate: a number, a 0-d tensor, or a dict of per-parameter rates
(Meta-SGD: shaped like the parameter; MAML++ LSLR: a 0-d tensor per parameter)."""

InnerLR = Rate | Sequence[Rate]
"""A rate for every step, or a sequence of ``num_steps`` rates (MAML++ per-step rates)."""

StepWeights = Sequence[float | Tensor] | Tensor | None
"""Weights of the query loss after each inner step (MAML++ multi-step loss)."""


@dataclasses.dataclass(frozen=True, eq=False)
class InnerLoop:
    """How each task adapts: one immutable value, changed with :meth:`replace`.

    Tensors in it (learned rates, step weights, an optimiser's hyper-parameters) are taken
    as they are, so their meta-gradients flow; the value itself never changes (compare
    values by their fields, not with ``==``: tensors have no single truth value).

    Attributes:
        inner_lr: a number or 0-d tensor; a dict ``{name: tensor}`` over exactly the
            adapted names, each of shape ``[]`` or the parameter's (Meta-SGD); or a
            sequence of ``num_steps`` of these, one per step (MAML++ LSLR).
        num_steps: inner gradient steps (``0`` only with ``head_init="prototypes"``:
            ProtoNet).
        adapt_keys: which parameters the inner loop adapts: a predicate on the name, a
            collection of names, or ``None`` for all (ANIL, BOIL).
        first_order: treat the inner gradients as constants (FOMAML).
        step_weights: ``num_steps`` weights of the query loss after each inner step
            (MAML++ multi-step loss); ``None`` scores the last step only.
        inner_optimizer: the inner step (:mod:`fmaml.inner_optim`); ``None``: plain SGD.
        head_init: ``"prototypes"``: each task's linear head starts from its support set's
            class prototypes (ProtoMAML; ProtoNet with ``num_steps=0``).

    Example:
        >>> maml = InnerLoop(inner_lr=0.4)
        >>> fomaml = maml.replace(first_order=True)
        >>> fomaml.first_order, fomaml.inner_lr, maml.first_order
        (True, 0.4, False)
    """

    inner_lr: InnerLR
    num_steps: int = 1
    adapt_keys: KeySelector = None
    first_order: bool = False
    step_weights: StepWeights = None
    inner_optimizer: InnerOptimizer | None = None
    head_init: Literal["prototypes"] | None = None

    def replace(self, **changes) -> InnerLoop:
        """This value with the fields in ``changes`` changed (a new value).

        Raises:
            TypeError: a name that is not a field.
        """
        return dataclasses.replace(self, **changes)


def check_inner(inner: object) -> InnerLoop:
    """``inner`` if it is an :class:`InnerLoop`.

    Raises:
        TypeError: anything else, with the call that builds one.
    """
    if not isinstance(inner, InnerLoop):
        got = type(inner).__name__
        hint = (
            f"fmaml.InnerLoop({inner!r})"
            if isinstance(inner, (int, float))
            else ("fmaml.InnerLoop(inner_lr, num_steps=..., ...)")
        )
        raise TypeError(
            f"inner_loop(): the inner loop's settings come as one fmaml.InnerLoop, got {got}. "
            f"Pass {hint}."
        )
    return inner
