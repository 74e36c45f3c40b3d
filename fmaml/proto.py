"""Prototype heads: ProtoNet's classifier as a task's initial linear head (ProtoMAML).

:func:`prototype_head` is per task (no task axis) and pure; :func:`fmaml.task_loss` and
:func:`fmaml.meta_loss` apply it before the inner loop with ``head_init="prototypes"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fmaml.types import Batch, Params

HEAD_KEYS = ("head.weight", "head.bias")
"""The parameters a prototype head replaces."""


@runtime_checkable
class EmbeddingLoss(Protocol):
    """A loss that can give the features its model's linear head sees
    (:class:`fmaml.SupervisedLoss` is one)."""

    def embed(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor: ...

    def linear_head(self) -> nn.Linear: ...


def prototypes(embeddings: Tensor, labels: Tensor, num_ways: int) -> Tensor:
    r"""The mean embedding of each class: :math:`c_k = \frac{1}{|S_k|}\sum_{i \in S_k} z_i`.

    Pure, differentiable in ``embeddings``, safe under ``vmap`` (no value checks: a class
    without examples gives a row of NaN; :func:`prototype_head`'s callers check the labels).

    Args:
        embeddings: ``[n, features]``.
        labels: ``[n]`` integers in ``0..num_ways-1``.
        num_ways: classes.

    Returns:
        ``[num_ways, features]``.

    Example:
        >>> import torch
        >>> prototypes(torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([0, 0, 1]), 2)
        tensor([[1.],
                [5.]])
    """
    classes = torch.arange(num_ways, device=labels.device)
    onehot = (labels[:, None] == classes).to(embeddings.dtype)  # [n, num_ways]
    return (onehot.T @ embeddings) / onehot.sum(0)[:, None]


def prototype_head(loss_fn: EmbeddingLoss, params: Mapping[str, Tensor], support: Batch) -> Params:
    r"""``params`` with the linear head set from the support set's class prototypes; one task.

    .. math:: W_k = 2 c_k, \qquad b_k = -\lVert c_k \rVert^2, \qquad
       c_k = \operatorname{mean}\{\, \mathrm{body}(x_i) : y_i = k \,\}

    so that the logits :math:`W z + b = -\lVert z - c_k \rVert^2 + \lVert z \rVert^2` are
    ProtoNet's negative squared Euclidean distances up to a constant per example, which a
    softmax ignores (Snell et al. 2017; as an initial head, Triantafillou et al. 2020).

    Pure and differentiable: the head is a function of the body's parameters through the
    prototypes, so a meta-gradient flows through it into the body. The prototypes are
    embedded at ``params`` (before any inner step), with the support set's own BatchNorm
    statistics, as the first inner step's support pass sees them.

    The meta-learned head is **replaced**, not added to, as in Triantafillou et al.'s
    Proto-MAML and its reference code (Meta-Dataset's ``proto_maml_fc_layer_init``):
    ``params["head.weight"]`` and ``params["head.bias"]`` fix the head's shape and enter
    with weight zero, so their meta-gradient is exactly zero (defined, not missing: every
    path and :func:`torch.autograd.grad` of all ``params`` work as for other algorithms).

    Args:
        loss_fn: a loss with ``embed(params, x) -> [n, features]`` and ``linear_head()``:
            :func:`fmaml.supervised_loss` of a model with ``body`` and a linear ``head``.
        params: ``{name: tensor}`` including ``head.weight [num_ways, features]`` and
            ``head.bias [num_ways]``.
        support: ``(x [n, *feature], y [n])``, integer labels in ``0..num_ways-1``, every
            class at least once (checked by :func:`fmaml.task_loss` and
            :func:`fmaml.meta_loss` outside ``vmap``, by :func:`check_support_labels`).

    Returns:
        A new dict with the keys of ``params`` in the same order.

    Raises:
        ValueError: ``loss_fn`` can't embed (not a :class:`fmaml.SupervisedLoss` of a model
            with ``body`` and a linear ``head`` with a bias); ``params`` lacks the head or its
            shapes don't match the model's head; labels that are not ``[n]`` integers; a body
            whose output is not ``[n, features]``.

    Example:
        >>> import torch, torch.nn.functional as F, fmaml
        >>> model = fmaml.nn.mlp(in_features=2, hidden=(4,), out_features=3)
        >>> loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
        >>> support = (torch.randn(6, 2), torch.arange(3).repeat(2))
        >>> head = fmaml.prototype_head(loss_fn, fmaml.params_of(model), support)
        >>> head["head.weight"].shape, head["head.bias"].shape
        (torch.Size([3, 4]), torch.Size([3]))

    References:
        Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017;
        Triantafillou et al., "Meta-Dataset", ICLR 2020, section 4 (Proto-MAML).
    """
    num_ways, features = check_head(loss_fn, params, "prototype_head")
    x, y = support
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.is_complex():
        raise ValueError(
            "prototype_head(): the support labels must be integers [n] for x [n, ...], got "
            f"{y.dtype} {list(y.shape)} for x {list(x.shape)}. Pass class indices "
            "0..num_ways-1 (a task's support set, without a task axis)."
        )
    z = loss_fn.embed(params, x)
    if z.dim() != 2 or z.shape[1] != features:
        raise ValueError(
            f"prototype_head(): the model's body gives {list(z.shape)} for x {list(x.shape)}, "
            f"but its head is linear over {features} features: expected [{x.shape[0]}, "
            f"{features}]. End the body with nn.Flatten() (fmaml.nn.conv4 does)."
        )
    c = prototypes(z, y, num_ways)
    weight, bias = params["head.weight"], params["head.bias"]
    # the meta-learned head is replaced; it enters with weight zero (a zero gradient)
    head = {"head.weight": 2 * c + 0 * weight, "head.bias": -c.square().sum(1) + 0 * bias}
    return {k: head.get(k, v) for k, v in params.items()}


def check_head(loss_fn, params: Mapping[str, Tensor], caller: str) -> tuple[int, int]:
    """``(num_ways, features)`` of ``loss_fn``'s linear head; raises if prototype heads can't
    be computed for it (structure only: safe under ``vmap``)."""
    if not isinstance(loss_fn, EmbeddingLoss):
        raise ValueError(
            f"{caller}(): head_init='prototypes' embeds the support set with the model's "
            f"body, so it needs a loss with `embed` and `linear_head` methods, got "
            f"{type(loss_fn).__name__}. Use fmaml.supervised_loss(model, F.cross_entropy) "
            "with a model that has `body` and `head` submodules (fmaml.nn.conv4)."
        )
    head = loss_fn.linear_head()
    expected = {
        "head.weight": [head.out_features, head.in_features],
        "head.bias": [head.out_features],
    }
    got = {k: list(params[k].shape) if k in params else None for k in HEAD_KEYS}
    if got != expected:
        raise ValueError(
            f"{caller}(): head_init='prototypes' replaces the linear head of the model "
            f"({head.out_features} ways over {head.in_features} features); `params` must hold "
            f"it with shapes {expected}, got {got} (None: missing). Build params with "
            "fmaml.params_of(model) from the same model."
        )
    return head.out_features, head.in_features


def check_support_labels(y: Tensor, num_ways: int, caller: str) -> None:
    """Raise unless every task's support labels ``y: [..., n]`` lie in ``0..num_ways-1`` and
    hold every class at least once.

    A check of values: skipped inside ``torch.func`` transforms and ``torch.compile``
    (where it can't branch on data); :func:`fmaml.meta_loss` runs it on the whole meta-batch
    before it vmaps.
    """
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(y):
        return
    if y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"{caller}(): head_init='prototypes' needs integer support labels (class "
            f"indices), got {y.dtype}. Pass y as a long tensor of classes 0..num_ways-1."
        )
    outside = (y < 0) | (y >= num_ways)
    if bool(outside.any()):
        found = sorted(set(y[outside].tolist()))
        raise ValueError(
            f"{caller}(): support labels must be classes 0..{num_ways - 1} (the head has "
            f"{num_ways} outputs), got {found[:5]}{' ...' if len(found) > 5 else ''}. "
            "Number each task's classes 0..num_ways-1, or build the model with as many "
            "outputs as the tasks have ways."
        )
    present = (y[..., :, None] == torch.arange(num_ways, device=y.device)).any(-2)
    if not bool(present.all()):
        where = (~present).nonzero()[0].tolist()
        task = f" of task {where[0]}" if len(where) == 2 else ""
        raise ValueError(
            f"{caller}(): class {where[-1]} has no example in the support set{task}, so it "
            f"has no prototype (the head has {num_ways} outputs). Give every class at least "
            "one support example (num_shots >= 1 for each of the num_ways classes)."
        )
