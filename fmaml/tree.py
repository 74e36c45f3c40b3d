"""Helpers for parameter dicts (flat pytrees keyed by parameter name).

Every function here is pure: it builds a new dict and never changes a tensor in place.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor

KeySelector = Callable[[str], bool] | Collection[str] | None
"""Which parameters to pick: a predicate on the name, a collection of names, or ``None`` (all)."""


def tree_map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor], *rest: Mapping[str, Tensor]):
    """Apply ``fn`` leaf-wise to one or more dicts with the same keys; returns a new dict.

    Args:
        fn: called as ``fn(tree[k], rest[0][k], ...)`` for every key ``k`` of ``tree``.
        tree: the dict whose keys (and order) the result has.
        *rest: further dicts holding at least the keys of ``tree``.

    Returns:
        ``{k: fn(tree[k], *(r[k] for r in rest)) for k in tree}``.

    Raises:
        KeyError: if a dict in ``rest`` lacks a key of ``tree``; the message lists them.

    Example:
        >>> import torch
        >>> tree_map(lambda a, b: a + b, {"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
        tensor([2., 2.])
    """
    for other in rest:
        missing = [k for k in tree if k not in other]
        if missing:
            raise KeyError(
                f"tree_map(): every dict must hold the keys of the first; missing: {missing}. "
                "Build the dicts from the same parameters."
            )
    return {k: fn(v, *(other[k] for other in rest)) for k, v in tree.items()}


def select(names: Collection[str], keys: KeySelector, *, caller: str = "select") -> list[str]:
    """The names picked by ``keys``, in the order of ``names``.

    Args:
        names: all parameter names.
        keys: a predicate ``name -> bool``, a collection of names, or ``None`` for all.
        caller: the public function to name in error messages.

    Returns:
        The selected names, in their original order.

    Raises:
        ValueError: if ``keys`` names parameters that do not exist, or selects nothing.

    Example:
        >>> select(["body.w", "head.w"], lambda k: k.startswith("head."))
        ['head.w']
    """
    names = list(names)
    if keys is None:
        chosen = names
    elif callable(keys):
        chosen = [n for n in names if keys(n)]
    else:
        if isinstance(keys, str):
            raise TypeError(
                f"{caller}(): `adapt_keys` must be a predicate or a collection of names, "
                f"got the string {keys!r}. Wrap it in a list: adapt_keys=[{keys!r}]."
            )
        wanted = set(keys)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise ValueError(
                f"{caller}(): `adapt_keys` names parameters the model does not have.\n"
                f"  unknown:   {unknown}\n"
                f"  available: {names}\n"
                "Use names from fmaml.params_of(model)."
            )
        chosen = [n for n in names if n in wanted]
    if not chosen:
        raise ValueError(
            f"{caller}(): `adapt_keys` selects no parameter to adapt.\n"
            f"  available: {names}\n"
            "Pass a predicate or names that match at least one, "
            "e.g. adapt_keys=lambda name: name.startswith('head.')."
        )
    return chosen


def partition(params: Mapping[str, Tensor], keys: KeySelector) -> tuple[dict, dict]:
    """Split ``params`` into ``(selected, rest)``; ``combine`` joins them again.

    This is how ANIL and BOIL are written: adapt ``selected``, keep ``rest`` fixed.

    Args:
        params: ``{name: tensor}``.
        keys: a predicate on the name, a collection of names, or ``None`` (all).

    Returns:
        ``(selected, rest)``, two new dicts that together hold every key of ``params``.

    Raises:
        ValueError: if ``keys`` is empty or names unknown parameters.

    Example:
        >>> import torch
        >>> head, body = partition({"body.w": torch.ones(1), "head.w": torch.ones(1)},
        ...                        lambda k: k.startswith("head."))
        >>> list(head), list(body)
        (['head.w'], ['body.w'])
    """
    chosen = set(select(params.keys(), keys, caller="partition"))
    selected = {k: v for k, v in params.items() if k in chosen}
    rest = {k: v for k, v in params.items() if k not in chosen}
    return selected, rest


def combine(*trees: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Merge dicts with disjoint keys into one new dict.

    Raises:
        ValueError: if two dicts share a key.

    Example:
        >>> import torch
        >>> sorted(combine({"a": torch.ones(1)}, {"b": torch.ones(1)}))
        ['a', 'b']
    """
    out: dict[str, Tensor] = {}
    for tree in trees:
        shared = sorted(set(out) & set(tree))
        if shared:
            raise ValueError(f"combine(): the dicts share keys {shared}; they must be disjoint.")
        out.update(tree)
    return out


def tree_detach(tree: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A new dict of detached tensors (they share storage with the inputs)."""
    return {k: v.detach() for k, v in tree.items()}


def tree_clone(tree: Mapping[str, Tensor], *, requires_grad: bool = False) -> dict[str, Tensor]:
    """A new dict of detached copies; leaves that require grad when ``requires_grad``."""
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in tree.items()}


def tree_norm(tree: Mapping[str, Tensor]) -> Tensor:
    """The global L2 norm of all leaves, as a 0-d tensor."""
    norms = [torch.linalg.vector_norm(v) for v in tree.values()]
    return torch.linalg.vector_norm(torch.stack(norms))


def tensors_in(value) -> list[Tensor]:
    """The distinct tensors in a rate, a rate dict, or a sequence of those, in order of first
    appearance (numbers and other values are skipped).

    Example:
        >>> import torch
        >>> lr = torch.tensor(0.1)
        >>> len(tensors_in([lr, {"w": lr, "b": 0.5}, 0.2]))
        1
    """
    if isinstance(value, Tensor):
        found = [value]
    elif isinstance(value, Mapping):
        found = [v for v in value.values() if isinstance(v, Tensor)]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        found = [t for v in value for t in tensors_in(v)]
    else:
        found = []
    return list({id(t): t for t in found}.values())
