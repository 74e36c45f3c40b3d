"""Which images each dataset is, split into train / val / test: :func:`load_splits`.

The one place that knows every image dataset: it calls the loaders
(:mod:`fmaml.tasks.omniglot`, :mod:`fmaml.tasks.miniimagenet`, :mod:`fmaml.tasks.folder`,
:mod:`fmaml.tasks.cifar100`, :mod:`fmaml.tasks.tieredimagenet`, :mod:`fmaml.tasks.cub`),
which build on :mod:`fmaml.tasks.images`; nothing imports back.
"""

from __future__ import annotations

import os

import torch

from fmaml.errors import ConfigError, check_positive_int
from fmaml.tasks.cifar100 import load_cifarfs_splits, load_fc100_splits
from fmaml.tasks.cub import load_cub_splits
from fmaml.tasks.folder import load_folder
from fmaml.tasks.images import ClassImages, parse_fractions, split_classes
from fmaml.tasks.miniimagenet import load_miniimagenet_splits
from fmaml.tasks.omniglot import load_omniglot, split_omniglot
from fmaml.tasks.tieredimagenet import load_tieredimagenet_splits

__all__ = ["DATASETS", "DOWNLOADABLE", "FIXED_SPLITS", "load_splits"]

DATASETS = ("omniglot", "miniimagenet", "folder", "cifarfs", "fc100", "tieredimagenet", "cub")

DOWNLOADABLE = ("omniglot", "cifarfs", "fc100", "cub")
"""The datasets with a stable official URL: ``download=True`` fetches them."""

FIXED_SPLITS = {
    "miniimagenet": "ravi",
    "cifarfs": "bertinetto",
    "fc100": "oreshkin",
    "tieredimagenet": "ren",
    "cub": "chen",
}
"""The datasets with one published split, and its name (the only ``split`` they take)."""

_IMAGE_SIZES = {"omniglot": 28, "cifarfs": 32, "fc100": 32}
"""Default image sides where they are not 84."""


def load_splits(
    dataset: str,
    data_root: str | os.PathLike[str],
    *,
    split: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    download: bool = False,
    verify: bool = True,
    seed: int = 0,
    cache: bool = True,
) -> dict[str, ClassImages]:
    """Load a dataset and split it into train / val / test: the entry point the CLI uses.

    Split strings (``split=None`` picks the default shown first):

    * ``"omniglot"`` (root: a folder of alphabets, or one holding ``images_background/`` and/or
      ``images_evaluation/``):

      - ``"maml"``: the MAML code's split: all 1,623 characters pooled, shuffled (seeded by
        ``seed``), 1100 train / 100 val / 423 test. Needs the full dataset; the default then.
      - ``"alphabet:T,V,E"``: alphabets shuffled and cut by proportions; alphabet-disjoint.
        The default for a partial root is ``"alphabet:0.75,0,0.25"``.
      - ``"character:T,V,E"``: characters pooled, shuffled and cut by proportions.
      - ``"alphabet"``: the official archives: background alphabets train, evaluation
        alphabets test, no val; ``"alphabet:V"`` also moves a proportion ``V`` of the
        background alphabets to val.

    * ``"miniimagenet"`` (root: ``images/`` + ``train.csv``/``val.csv``/``test.csv``, or the
      ``mini-imagenet-cache-{train,val,test}.pkl`` files): ``"ravi"``, the only split
      (Ravi & Larochelle: 64 / 16 / 20 classes); ``seed`` is not used.
    * ``"folder"`` (root: ``<root>/<class>/<image>``): ``"T,V,E"`` proportions of the classes,
      default ``"0.7,0.1,0.2"``.
    * ``"cifarfs"`` and ``"fc100"`` (root: ``cifar-100-python.tar.gz`` or
      ``cifar-100-python/``): ``"bertinetto"`` (64 / 16 / 20 classes) and ``"oreshkin"``
      (12 / 4 / 4 superclasses, 60 / 20 / 20 classes), the only splits; 32x32.
    * ``"tieredimagenet"`` (root: ``{train,val,test}_labels.pkl`` with
      ``{split}_images_png.pkl`` or ``{split}_images.npz``): ``"ren"``, the release's
      351 / 97 / 160 classes.
    * ``"cub"`` (root: ``CUB_200_2011/images/`` or ``CUB_200_2011.tgz``): ``"chen"``, the
      100 / 50 / 50 classes of Hilliard et al. and Chen et al.

    Args:
        dataset: one of :data:`DATASETS`.
        data_root: the dataset's folder.
        split: a split string as above, or None for the default.
        image_size: side of the square images; default 28 (Omniglot), 32 (CIFAR-FS, FC100)
            or 84.
        channels: ``folder`` only: 1 (grey) or 3 (RGB, the default).
        download: :data:`DOWNLOADABLE` only: fetch the official archives if they are not in
            ``data_root`` (Omniglot into ``data_root``, the others into fmaml's cache).
        verify: check archives against their published md5 (False: accept a re-packed or
            modified copy).
        seed: seeds the shuffle of the proportional and MAML splits.
        cache: keep the decoded, resized images in a cache file (see :mod:`fmaml.tasks.cache`).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``; ``"val"`` is **absent** when the split
        has no validation classes (e.g. ``"alphabet:0.75,0,0.25"``).

    Raises:
        ValueError: an unknown dataset or split string, or an option the dataset doesn't take.
        DataError: missing or unusable data; the message says what was found and what to do.

    Example:
        >>> splits = load_splits("omniglot", "data/omniglot", split="alphabet:0.75,0,0.25")
        ... # doctest: +SKIP
        >>> sorted(splits)  # doctest: +SKIP
        ['test', 'train']
    """
    where = "load_splits()"
    if dataset not in DATASETS:
        raise ConfigError(f"{where}: unknown dataset {dataset!r}; choose one of {DATASETS}.")
    if image_size is not None:
        check_positive_int(image_size, "image_size", where)
    if channels is not None and dataset != "folder":
        raise ConfigError(
            f"{where}: `channels` applies to dataset='folder' only ({dataset} has fixed "
            "channels). Leave it unset."
        )
    if download and dataset not in DOWNLOADABLE:
        raise ConfigError(
            f"{where}: download=True is only possible for {', '.join(DOWNLOADABLE)}; {dataset} "
            f"must be put in {os.fspath(data_root)!r} by hand (see docs/data.md)."
        )
    if dataset in FIXED_SPLITS and split not in (None, FIXED_SPLITS[dataset]):
        raise ConfigError(
            f"{where}: {dataset} has one split, {FIXED_SPLITS[dataset]!r} (the published one), "
            f"got {split!r}. Leave --split unset."
        )
    size = image_size or _IMAGE_SIZES.get(dataset, 84)
    if dataset == "omniglot":
        data = load_omniglot(data_root, image_size=size, download=download, cache=cache)
        return split_omniglot(data, split, seed=seed)
    if dataset == "miniimagenet":
        return load_miniimagenet_splits(data_root, image_size=size, cache=cache)
    if dataset in ("cifarfs", "fc100", "cub"):
        load = {"cifarfs": load_cifarfs_splits, "fc100": load_fc100_splits, "cub": load_cub_splits}
        return load[dataset](
            data_root, image_size=size, download=download, verify=verify, cache=cache
        )
    if dataset == "tieredimagenet":
        return load_tieredimagenet_splits(data_root, image_size=size, cache=cache)
    data = load_folder(data_root, image_size=size, channels=channels or 3, cache=cache)
    fractions = parse_fractions(split or "0.7,0.1,0.2", where=f"{where} (folder split)")
    return split_classes(data, fractions, torch.Generator().manual_seed(seed))
