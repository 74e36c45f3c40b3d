"""Walks over autograd graphs: which leaves a result depends on.

The execution strategies (:mod:`fmaml.engine.strategy`) compute a meta-gradient chunk by chunk and
hand it out later; these walks find the tensors requiring grad that a chunk's graph reaches
besides the ones it was handed (tensors a ``loss_fn`` captures), so that none is left out.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def reached_leaves(
    outputs: Iterable[Tensor], stop: Iterable[Tensor] = (), skip: Iterable[Tensor] = ()
) -> tuple[list[Tensor], list[Tensor]]:
    """The leaves requiring grad that the graph of ``outputs`` reaches, and the tensors of
    ``stop`` it reaches, each in the order found.

    The walk does not go past a tensor of ``stop`` (a leaf, or a non-leaf whose own graph
    is not followed) and leaves out the leaves of ``skip``. Pure; reads the graph only.

    Example:
        >>> import torch
        >>> a, b, c = (torch.ones(2, requires_grad=True) for _ in range(3))
        >>> mid = a * 2
        >>> leaves, stops = reached_leaves([(mid * c).sum()], stop=[mid, b])
        >>> [t is c for t in leaves], [t is mid for t in stops]
        ([True], [True])
    """
    stop = list(stop)
    stop_leaves = {id(t): t for t in stop if t.grad_fn is None}
    stop_edges = {(t.grad_fn, t.output_nr): t for t in stop if t.grad_fn is not None}
    skipped = {id(t) for t in skip}
    found: dict[int, Tensor] = {}
    stops: dict[int, Tensor] = {}

    def leaf(t: Tensor) -> None:
        if id(t) in stop_leaves:
            stops.setdefault(id(t), t)
        elif id(t) not in skipped:
            found.setdefault(id(t), t)

    edges = []
    for out in outputs:
        if out.grad_fn is not None:
            edges.append((out.grad_fn, out.output_nr))
        elif out.requires_grad:
            leaf(out)
    seen = set()
    while edges:
        node, nr = edges.pop()
        if node is None:
            continue
        if (node, nr) in stop_edges:
            hit = stop_edges[(node, nr)]
            stops.setdefault(id(hit), hit)
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:  # an AccumulateGrad node: a leaf
            leaf(variable)
            continue
        if node in seen:
            continue
        seen.add(node)
        edges.extend(node.next_functions)
    return list(found.values()), list(stops.values())


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
