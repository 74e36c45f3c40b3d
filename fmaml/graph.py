"""Walks over autograd graphs: which leaves a result depends on.

The engine (:mod:`fmaml.engine.run`) differentiates each of its inputs on its own: one
computed from another would have its gradient counted twice, and a recomputed piece is
differentiated only for the inputs no other input is computed from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor


def depends_on(tensor: Tensor, others: Iterable[Tensor]) -> list[Tensor]:
    """The tensors of ``others`` that ``tensor`` is computed from (through its graph)."""
    others = [t for t in others if t is not tensor]
    if tensor.grad_fn is None or not others:
        return []
    leaves = {id(t) for t in others if t.grad_fn is None}
    edges_of = {(t.grad_fn, t.output_nr): t for t in others if t.grad_fn is not None}
    hits: dict[int, Tensor] = {}
    by_id = {id(t): t for t in others}
    edges, seen = list(tensor.grad_fn.next_functions), set()
    while edges:
        node, nr = edges.pop()
        if node is None:
            continue
        if (node, nr) in edges_of:
            hit = edges_of[(node, nr)]
            hits[id(hit)] = hit
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) in leaves:
                hits[id(variable)] = by_id[id(variable)]
            continue
        if node in seen:
            continue
        seen.add(node)
        edges.extend(node.next_functions)
    return list(hits.values())


def check_independent(tensors: list[Tensor], label: Callable[[Tensor], str]) -> None:
    """Raise ``ValueError`` if one of ``tensors`` is computed from another: each is handed
    its own gradient, and the one upstream would be counted twice by whoever adds them up.

    Args:
        tensors: the tensors to be differentiated.
        label: names a tensor in the message (e.g. ``"params['w']"``).
    """
    for t in tensors:
        upstream = depends_on(t, tensors)
        if upstream:
            raise ValueError(
                f"value_and_grad(): {label(t)} is computed from "
                f"{', '.join(label(u) for u in upstream)}, which it also differentiates: that "
                "gradient would be counted twice. Pass only the tensors it is computed from "
                "(compute the rest inside loss_fn), or differentiate fmaml.meta_loss."
            )
