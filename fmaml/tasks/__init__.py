"""Task samplers: sinusoid regression and N-way K-shot episodes over class images.

The image names (:class:`ClassImages`, :class:`EpisodeSampler`, ...) load
:mod:`fmaml.tasks.images`, and with it PIL and numpy, when first used.
"""

import importlib

from fmaml.tasks.sinusoid import SinusoidTasks

_FROM_IMAGES = ("ClassImages", "DataError", "EpisodeSampler", "load_splits")

__all__ = ["ClassImages", "DataError", "EpisodeSampler", "SinusoidTasks", "load_splits"]


def __getattr__(name: str):
    if name in _FROM_IMAGES:
        value = getattr(importlib.import_module("fmaml.tasks.images"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fmaml.tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
