"""Task samplers: sinusoid regression and N-way K-shot episodes over class images."""

from fmaml.tasks.images import ClassImages, DataError, EpisodeSampler, load_splits
from fmaml.tasks.sinusoid import SinusoidTasks

__all__ = ["ClassImages", "DataError", "EpisodeSampler", "SinusoidTasks", "load_splits"]
