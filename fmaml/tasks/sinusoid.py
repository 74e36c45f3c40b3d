"""Sinusoid regression tasks (MAML paper, section 5.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fmaml.types import Task


@dataclass(frozen=True)
class SinusoidTasks:
    """Sinusoid tasks ``y = A sin(x - phase)`` (Finn et al. 2017, section 5.1).

    ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``, drawn per task.

    Args:
        num_shots: support points per task (``K``).
        num_query: query points per task; defaults to ``num_shots``.
        amplitude: range of ``A``.
        phase: range of the phase.
        x_range: range of ``x``.

    Example:
        >>> import torch
        >>> tasks = SinusoidTasks(num_shots=10).sample(25, torch.Generator().manual_seed(0))
        >>> tasks.support[0].shape, tasks.query[1].shape
        (torch.Size([25, 10, 1]), torch.Size([25, 10, 1]))
    """

    num_shots: int = 10
    num_query: int | None = None
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        for name in ("num_shots", "num_query"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"SinusoidTasks(): `{name}` must be a positive integer, got {value!r}."
                )

    def sample(
        self,
        num_tasks: int,
        generator: torch.Generator,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Task:
        """A meta-batch of ``num_tasks`` tasks drawn with ``generator`` (on ``device``).

        Returns:
            :class:`fmaml.Task` with ``x, y: [num_tasks, num_shots or num_query, 1]``.
        """
        num_query = self.num_query or self.num_shots
        device = generator.device if device is None else device

        def uniform(low_high, *shape):
            low, high = low_high
            u = torch.rand(*shape, generator=generator, dtype=dtype, device=device)
            return low + (high - low) * u

        amplitude = uniform(self.amplitude, num_tasks, 1, 1)
        phase = uniform(self.phase, num_tasks, 1, 1)
        x = uniform(self.x_range, num_tasks, self.num_shots + num_query, 1)
        y = amplitude * torch.sin(x - phase)
        return Task(
            support=(x[:, : self.num_shots], y[:, : self.num_shots]),
            query=(x[:, self.num_shots :], y[:, self.num_shots :]),
        )
