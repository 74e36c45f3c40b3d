"""The published class splits shipped with fmaml: ``fmaml/tasks/splits/<name>.json``.

Each file holds the split's source (``"source"``), what its names are (``"unit"``) and the
names of the ``"train"``, ``"val"`` and ``"test"`` classes (or superclasses, for FC100):

* ``cifarfs``: CIFAR-FS (Bertinetto et al., ICLR 2019), 64 / 16 / 20 CIFAR-100 classes;
* ``fc100``: FC100 (Oreshkin et al., NeurIPS 2018), 12 / 4 / 4 CIFAR-100 superclasses;
* ``cub``: CUB-200-2011's few-shot split (Hilliard et al. 2018; Chen et al., ICLR 2019),
  100 / 50 / 50 class folders.

tiered-ImageNet needs no file here: its release splits its classes into its own files.
"""

from __future__ import annotations

import json
from importlib import resources

from fmaml.tasks.images import SPLIT_NAMES

__all__ = ["PUBLISHED_SPLITS", "published_split"]

PUBLISHED_SPLITS = ("cifarfs", "fc100", "cub")
"""The names :func:`published_split` takes."""


def published_split(name: str) -> dict[str, tuple[str, ...]]:
    """The class names of each split of a published benchmark.

    Args:
        name: one of :data:`PUBLISHED_SPLITS`.

    Returns:
        ``{"train": names, "val": names, "test": names}``, each a tuple in the file's order.

    Raises:
        ValueError: an unknown ``name``.

    Example:
        >>> {split: len(names) for split, names in published_split("cifarfs").items()}
        {'train': 64, 'val': 16, 'test': 20}
    """
    if name not in PUBLISHED_SPLITS:
        raise ValueError(
            f"published_split(): no published split {name!r}; choose one of {PUBLISHED_SPLITS}."
        )
    text = resources.files("fmaml.tasks").joinpath("splits", f"{name}.json").read_text("utf-8")
    stored = json.loads(text)
    return {split: tuple(stored[split]) for split in SPLIT_NAMES}
