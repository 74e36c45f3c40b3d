"""Task samplers: sinusoid regression and N-way K-shot episodes over class images; tasks
of different shapes padded into one meta-batch (:func:`pad_tasks`).

The image names (:class:`ClassImages`, :class:`EpisodeSampler`, ...) load
:mod:`fmaml.tasks.images`, and with it PIL and numpy, when first used.
"""

import importlib

from fmaml.tasks.padded import pad_tasks
from fmaml.tasks.sinusoid import SinusoidTasks

_LAZY = {
    "ClassImages": "fmaml.tasks.images",
    "DataError": "fmaml.tasks.images",
    "EpisodeSampler": "fmaml.tasks.images",
    "load_splits": "fmaml.tasks.datasets",
}
"""Names whose modules import PIL: ``name -> module``, imported on first use."""

__all__ = [
    "ClassImages",
    "DataError",
    "EpisodeSampler",
    "SinusoidTasks",
    "load_splits",
    "pad_tasks",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fmaml.tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
