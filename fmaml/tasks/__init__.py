"""Task samplers: sinusoid regression and N-way K-shot episodes over class images."""

from fmaml.tasks.sinusoid import SinusoidTasks

__all__ = ["SinusoidTasks"]
