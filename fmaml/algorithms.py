"""Named MAML-family algorithms, each a setting of the same functions.

| name      | setting                                         | paper                             |
| --------- | ----------------------------------------------- | --------------------------------- |
| maml      | second-order, adapt every parameter             | Finn, Abbeel & Levine, ICML 2017  |
| fomaml    | ``first_order=True``                            | same paper, section 5.2           |
| anil      | ``adapt_keys``: the head only                   | Raghu et al., ICLR 2020           |
| boil      | ``adapt_keys``: the body only                   | Oh et al., ICLR 2021              |
| metasgd   | ``inner_lr``: a learned per-element dict        | Li et al., arXiv 1707.09835, 2017 |
| mamlpp    | MAML with all five MAML++ fixes (train loop)    | Antoniou et al., ICLR 2019        |
| reptile   | ``objective="reptile"``: mean of params-adapted | Nichol et al., arXiv 1803.02999   |
| protonet  | ``head_init="prototypes"``, ``num_steps=0``     | Snell et al., NeurIPS 2017        |
| protomaml | ``head_init="prototypes"``, then inner steps    | Triantafillou et al., ICLR 2020   |
| imaml     | ``objective=IMAML(lam, cg_steps)``: implicit    | Rajeswaran et al., NeurIPS 2019   |

MAML++'s fixes are training-loop settings on top of an algorithm (see
:class:`fmaml.training.config.TrainConfig`): LSLR (``inner_lr`` a list of per-tensor rate
dicts), MSL (``step_weights`` from :func:`fmaml.schedules.msl_weights`), DA (``first_order`` from
:func:`fmaml.schedules.first_order_at`), BNWB (:func:`fmaml.per_step` over the BatchNorm
parameters) and CA (:func:`fmaml.schedules.cosine_lr`).

The inner optimiser is a setting of every algorithm too (``inner_optimizer=``, from
:mod:`fmaml.inner_optim`; ``TrainConfig.inner_optimizer``): plain SGD by default, momentum or
Adam, their betas optionally meta-learned (``TrainConfig.learn_inner_hyper``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from fmaml.inner_loop import InnerLoop, InnerLR


def head_keys(name: str) -> bool:
    """ANIL's selection: parameters of the ``head`` submodule."""
    return name.startswith("head.")


def body_keys(name: str) -> bool:
    """BOIL's selection: everything but the ``head`` submodule."""
    return not name.startswith("head.")


@dataclass(frozen=True)
class Algorithm:
    """The knobs that distinguish one MAML-family algorithm from another.

    Attributes:
        name: the name used on the command line.
        first_order: drop second-order terms (FOMAML).
        adapt_keys: which parameters the inner loop adapts (``None``: all).
        learned_rates: ``None`` for a fixed inner rate, ``"element"`` for Meta-SGD's
            per-element rates, ``"tensor"`` for one rate per parameter tensor.
        objective: what the outer step follows: ``"query"``, the gradient of the query loss
            after adapting (MAML and its variants), or ``"reptile"``, the mean over tasks
            of ``params - adapted`` (:func:`fmaml.reptile_loss`), or ``"imaml"``, the
            implicit gradient of the query loss after a regularised inner problem
            (:func:`fmaml.imaml_loss`; its ``lam`` and ``cg_steps`` come from the run's
            config, ``--imaml-lam`` and ``--cg-steps``).
        head_init: ``None``, or ``"prototypes"``: each task's linear head starts from its
            support set's class prototypes (:func:`fmaml.prototype_head`).
        inner_steps: a fixed number of inner steps in training (``0`` for ProtoNet);
            ``None``: the dataset's default or the user's choice.
    """

    name: str
    first_order: bool = False
    adapt_keys: object = None
    learned_rates: Literal["element", "tensor"] | None = None
    objective: Literal["query", "reptile", "imaml"] = "query"
    head_init: Literal["prototypes"] | None = None
    inner_steps: int | None = None

    def inner_loop(self, inner_lr: InnerLR, num_steps: int = 1) -> InnerLoop:
        """This algorithm's inner loop at ``inner_lr`` (a learned dict for Meta-SGD, built
        with :func:`fmaml.init_rates`) and ``num_steps`` (``inner_steps`` if it fixes them).

        Example:
            >>> get_algorithm("anil").inner_loop(0.4).adapt_keys("head.weight")
            True
            >>> get_algorithm("protonet").inner_loop(0.4, num_steps=5).num_steps
            0
        """
        return InnerLoop(
            inner_lr=inner_lr,
            num_steps=num_steps if self.inner_steps is None else self.inner_steps,
            adapt_keys=self.adapt_keys,
            first_order=self.first_order,
            head_init=self.head_init,
        )


MAML = Algorithm("maml")
"""Second-order MAML over every parameter; every other algorithm is it with knobs changed."""


def _variant(name: str, **changes) -> Algorithm:
    return dataclasses.replace(MAML, name=name, **changes)


ALGORITHMS: dict[str, Algorithm] = {
    "maml": MAML,
    "fomaml": _variant("fomaml", first_order=True),
    "anil": _variant("anil", adapt_keys=head_keys),
    "boil": _variant("boil", adapt_keys=body_keys),
    "metasgd": _variant("metasgd", learned_rates="element"),
    "mamlpp": _variant("mamlpp"),
    "reptile": _variant("reptile", first_order=True, objective="reptile"),
    "protonet": _variant("protonet", head_init="prototypes", inner_steps=0),
    "protomaml": _variant("protomaml", head_init="prototypes"),
    "imaml": _variant("imaml", objective="imaml"),
}


def get_algorithm(name: str) -> Algorithm:
    """The :class:`Algorithm` called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:
        >>> get_algorithm("fomaml").first_order
        True
    """
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"get_algorithm(): unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}."
        ) from None
