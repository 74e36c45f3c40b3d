"""Task samplers: sinusoid regression and N-way K-shot episodes over class images; tasks
of different shapes padded into one meta-batch (:func:`pad_tasks`); the dataset loaders
(Omniglot, mini-ImageNet, CIFAR-FS, FC100, tiered-ImageNet, CUB, class folders).

The image names (:class:`ClassImages`, :class:`EpisodeSampler`, the loaders, ...) load
:mod:`fmaml.tasks.images`, and with it PIL and numpy, when first used.
"""

import importlib

from fmaml.tasks.padded import pad_tasks
from fmaml.tasks.sinusoid import SinusoidTasks

_LAZY = {
    "ClassImages": "fmaml.tasks.images",
    "DataError": "fmaml.tasks.images",
    "EpisodeSampler": "fmaml.tasks.images",
    "load_cifarfs_splits": "fmaml.tasks.cifar100",
    "load_cub": "fmaml.tasks.cub",
    "load_cub_splits": "fmaml.tasks.cub",
    "load_fc100_splits": "fmaml.tasks.cifar100",
    "load_folder": "fmaml.tasks.folder",
    "load_miniimagenet_splits": "fmaml.tasks.miniimagenet",
    "load_omniglot": "fmaml.tasks.omniglot",
    "load_splits": "fmaml.tasks.datasets",
    "load_tieredimagenet": "fmaml.tasks.tieredimagenet",
    "load_tieredimagenet_splits": "fmaml.tasks.tieredimagenet",
    "published_split": "fmaml.tasks.published",
    "read_cifar100": "fmaml.tasks.cifar100",
}
"""Names whose modules import PIL: ``name -> module``, imported on first use."""

__all__ = ["SinusoidTasks", "pad_tasks", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fmaml.tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
