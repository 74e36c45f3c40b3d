"""Recomputed pieces: run a function without keeping its graph, recompute it in the backward.

A :data:`fmaml.adapt.Call` for the inner loop, like ``torch.utils.checkpoint`` but composing
with ``torch.func`` (whose transforms refuse saved-tensor hooks): the pieces may use
``torch.func.grad`` and ``vmap`` inside. The engine's ``Strategy(checkpoint=True)`` runs the
inner loop with it; what is computed does not change (``tests/test_strategy.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from fmaml.adapt import Call


def recomputing(closure: list[Tensor], batched: bool) -> Call:
    """A ``call`` for the inner loop (:data:`fmaml.adapt.Call`) that runs each piece without
    keeping its graph and recomputes it in the backward: the memory of one piece's graph
    instead of all of them, for one more forward per piece.

    Args:
        closure: every tensor requiring grad that the pieces use besides their carry (the
            meta-parameters, rates, hyper-parameters, captured tensors), none computed from
            another: their gradients are pulled back through each recomputed piece.
        batched: the loop runs over a chunk of tasks (a leading task axis) and each piece is
            vmapped over it; else one task.

    Raises:
        ValueError: (when a piece runs) a carry holding anything but tensors.
    """

    def call(piece, carry, data, shared=False):
        def checked(carry, data):
            out = piece(carry, data)
            kinds = {type(t).__name__ for t in tree_flatten(out)[0] if not isinstance(t, Tensor)}
            if kinds:
                raise ValueError(
                    "recomputing(): Strategy(checkpoint=True) keeps the inner optimiser's state "
                    f"between steps, so it must hold tensors only, but it holds {sorted(kinds)}. "
                    "Keep a step counter as a 0-d tensor (as fmaml.inner_optim.adam does), or "
                    "use checkpoint=False."
                )
            return out

        fn = torch.func.vmap(checked, in_dims=(None if shared else 0, 0)) if batched else checked
        flat, spec = tree_flatten(carry)
        out_spec: list = []

        def run(*values):
            return fn(tree_unflatten(list(values), spec), data)

        out = _Recompute.apply(run, out_spec, len(flat), *flat, *closure)
        return tree_unflatten(list(out), out_spec[0])

    return call


class _Recompute(torch.autograd.Function):
    """``run(*carry)`` without a graph; its backward recomputes it and pulls the gradient
    back to the carry and the closure tensors."""

    @staticmethod
    def forward(ctx, run, out_spec, num_carry, *tensors):
        ctx.run, ctx.closure = run, tensors[num_carry:]
        ctx.save_for_backward(*tensors[:num_carry])
        flat, spec = tree_flatten(run(*tensors[:num_carry]))
        out_spec.append(spec)
        return tuple(flat)

    @staticmethod
    def backward(ctx, *grad_outputs):
        carry = [
            t.detach().requires_grad_(t.is_floating_point() or t.is_complex())
            for t in ctx.saved_tensors
        ]
        with torch.enable_grad():
            outputs = tree_flatten(ctx.run(*carry))[0]
        pairs = [
            (o, g)
            for o, g in zip(outputs, grad_outputs, strict=True)
            if g is not None and isinstance(o, Tensor) and o.requires_grad
        ]
        wrt = [*(c for c in carry if c.requires_grad), *ctx.closure]
        grads = [None] * len(wrt)
        if pairs:
            grads = torch.autograd.grad(
                [o for o, _ in pairs],
                wrt,
                [g for _, g in pairs],
                allow_unused=True,
                retain_graph=True,  # the pieces reach tensors computed before them
            )
        grads = iter(grads)
        carry_grads = [next(grads) if c.requires_grad else None for c in carry]
        return (None, None, None, *carry_grads, *grads)
