"""MAML++ schedules: pure functions of the epoch or iteration (Antoniou et al., ICLR 2019).

Being functions of the iteration alone, they need no state in a checkpoint: a resumed run
follows exactly the schedule an uninterrupted one does.
"""

from __future__ import annotations

import math


def msl_weights(num_steps: int, epoch: int, msl_epochs: int) -> list[float] | None:
    """Multi-step loss weights for ``epoch``, or ``None`` once MSL is over (last step only).

    Weights start uniform at ``1/N``; each non-final weight shrinks by ``1/N/E`` per epoch to a
    floor of ``0.03/N``, and the final weight grows by ``(N-1)/N/E`` per epoch to at most
    ``1 - (N-1) * 0.03/N`` (the MAML++ reference implementation). MSL is used for the first
    ``E = msl_epochs`` epochs.

    Args:
        num_steps: inner steps ``N``.
        epoch: the current epoch, from 0.
        msl_epochs: ``E``; 0 switches MSL off.

    Returns:
        ``N`` weights, or ``None`` when MSL is off or over.

    Example:
        >>> msl_weights(4, 0, 10)
        [0.25, 0.25, 0.25, 0.25]
        >>> msl_weights(4, 10, 10) is None
        True
    """
    if msl_epochs <= 0 or epoch >= msl_epochs or num_steps == 1:
        return None
    decay = 1.0 / num_steps / msl_epochs
    floor = 0.03 / num_steps
    non_final = max(1.0 / num_steps - epoch * decay, floor)
    final = min(1.0 / num_steps + epoch * (num_steps - 1) * decay, 1.0 - (num_steps - 1) * floor)
    return [non_final] * (num_steps - 1) + [final]


def first_order_at(epoch: int, da_epochs: int) -> bool:
    """Derivative-order annealing: first-order for the first ``da_epochs`` epochs."""
    return epoch < da_epochs


def cosine_lr(iteration: int, total: int, start: float, end: float) -> float:
    """Cosine annealing from ``start`` at iteration 0 to ``end`` at ``total``.

    Example:
        >>> cosine_lr(0, 100, 1e-3, 1e-5), cosine_lr(100, 100, 1e-3, 1e-5)
        (0.001, 1e-05)
    """
    progress = min(max(iteration / max(total, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))
