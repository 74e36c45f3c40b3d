"""CIFAR-FS and FC100: few-shot splits of CIFAR-100, read from its official python archive.

CIFAR-100 (Krizhevsky 2009) has 100 classes ("fine labels") in 20 superclasses ("coarse
labels"), 600 32x32 colour images each (500 in ``train``, 100 in ``test``). Both few-shot
benchmarks pool the 600 images of a class and split the classes:

* CIFAR-FS (Bertinetto et al., ICLR 2019): 64 / 16 / 20 classes, mixed superclasses;
* FC100 (Oreshkin et al., NeurIPS 2018): by superclass, 12 / 4 / 4 superclasses of 5 classes
  each (60 / 20 / 20 classes), so that test classes are far from the training ones.

The split lists ship with fmaml (:mod:`fmaml.tasks.published`). ``root`` holds one of:

* ``cifar-100-python.tar.gz``, the official archive: checked against its md5 and unpacked into
  fmaml's cache (:mod:`fmaml.tasks.archives`), never beside it;
* ``cifar-100-python/`` (the unpacked archive) or ``train``, ``test`` and ``meta`` themselves:
  each file checked against the md5 torchvision publishes for it.

The files are Python 2 pickles: ``train`` and ``test`` a dict with ``b'data'`` (uint8
``[N, 3072]``, the red, green and blue 32x32 planes), ``b'fine_labels'``, ``b'coarse_labels'``
and ``b'filenames'``; ``meta`` with ``b'fine_label_names'`` and ``b'coarse_label_names'``.
They are read by :func:`fmaml.tasks.safe_pickle.read_array_pickle`, which refuses anything but
containers, strings, numbers and numeric arrays, so a crafted file can't run code. Images
resized to another ``image_size`` (LANCZOS) are cached (:mod:`fmaml.tasks.cache`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fmaml.tasks.archives import check_md5, fetch, unpack
from fmaml.tasks.cache import cached_images
from fmaml.tasks.images import SPLIT_NAMES, ClassImages, DataError, resize_images
from fmaml.tasks.published import published_split
from fmaml.tasks.safe_pickle import read_array_pickle

__all__ = [
    "CIFAR100_ARCHIVE",
    "CIFAR100_MD5",
    "CIFAR100_URL",
    "Cifar100",
    "load_cifarfs_splits",
    "load_fc100_splits",
    "read_cifar100",
]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
"""The official archive (Krizhevsky's page)."""

CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"

CIFAR100_MD5 = {
    CIFAR100_ARCHIVE: "eb9058c3a382ffc7106e4002c42a8d85",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
"""Published md5 digests: the archive, and each unpacked file (as torchvision checks them)."""

_FILES = ("train", "test", "meta")


class Cifar100(NamedTuple):
    """All 60,000 CIFAR-100 images (``train`` then ``test``) with both labels.

    Attributes:
        images: ``[60000, 3, 32, 32]`` uint8.
        fine: ``[60000]`` int64 class of each image, indexing ``fine_names``.
        coarse: ``[60000]`` int64 superclass of each image, indexing ``coarse_names``.
        fine_names: the 100 class names (``meta``'s order).
        coarse_names: the 20 superclass names.
        folder: where ``train``, ``test`` and ``meta`` were read.
    """

    images: np.ndarray
    fine: np.ndarray
    coarse: np.ndarray
    fine_names: tuple[str, ...]
    coarse_names: tuple[str, ...]
    folder: Path


def _find(root: Path, download: bool, verify: bool, url: str, where: str) -> Path:
    """The folder holding ``train``, ``test`` and ``meta``, checked when ``verify``."""
    if not root.is_dir():
        raise DataError(
            f"{where}: the data folder {os.fspath(root)!r} does not exist. Create it and put "
            f"{CIFAR100_ARCHIVE} (from {CIFAR100_URL}) or its unpacked {CIFAR100_FOLDER}/ in it."
        )
    for folder in (root / CIFAR100_FOLDER, root):
        if all((folder / name).is_file() for name in _FILES):
            if verify:
                for name in _FILES:
                    check_md5(folder / name, CIFAR100_MD5[name], where=where)
            return folder
    archive = root / CIFAR100_ARCHIVE
    if not archive.is_file():
        if not download:
            raise DataError(
                f"{where}: found neither {CIFAR100_ARCHIVE} nor {CIFAR100_FOLDER}/ (with train, "
                f"test and meta) in {os.fspath(root)!r}. Download {CIFAR100_URL} and put it "
                "there, or pass download=True (CLI: --download) to fetch it into fmaml's cache."
            )
        archive = fetch(
            url,
            CIFAR100_ARCHIVE,
            CIFAR100_MD5[CIFAR100_ARCHIVE] if verify else None,
            where=where,
            hint=f"download {CIFAR100_ARCHIVE} by hand and put it in {os.fspath(root)!r}",
        )
    elif verify:
        check_md5(archive, CIFAR100_MD5[CIFAR100_ARCHIVE], where=where)
    folder = unpack(archive, where=where) / CIFAR100_FOLDER
    if not all((folder / name).is_file() for name in _FILES):
        raise DataError(
            f"{where}: {os.fspath(archive)!r} does not hold {CIFAR100_FOLDER}/train, test and "
            f"meta. Use the official archive from {CIFAR100_URL}."
        )
    return folder


def _read(path: Path, keys: tuple[str, ...], where: str) -> dict:
    """A CIFAR pickle's dict, its byte-string keys (Python 2) read as text."""
    stored = read_array_pickle(path, where=where)
    if isinstance(stored, Mapping):
        stored = {
            (key.decode("latin1") if isinstance(key, bytes) else key): value
            for key, value in stored.items()
        }
    missing = sorted(set(keys) - set(stored)) if isinstance(stored, dict) else list(keys)
    if missing:
        raise DataError(
            f"{where}: {os.fspath(path)!r} should hold a dict with the keys {list(keys)}, but "
            f"{missing} are missing. The file is damaged or not CIFAR-100's: download "
            f"{CIFAR100_ARCHIVE} again."
        )
    return stored


def _names(value: object, count: int, path: Path, key: str, where: str) -> tuple[str, ...]:
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in value or ()]
    if len(names) != count or not all(isinstance(n, str) for n in names):
        raise DataError(
            f"{where}: {key!r} in {os.fspath(path)!r} should list {count} names, found "
            f"{len(names)}. The file is damaged: download {CIFAR100_ARCHIVE} again."
        )
    return tuple(names)


def _labels(value: object, count: int, num: int, path: Path, key: str, where: str) -> np.ndarray:
    labels = np.asarray(value if value is not None else [])
    if (
        labels.shape != (count,)
        or labels.dtype.kind not in "iu"
        or (count and (labels.min() < 0 or labels.max() >= num))
    ):
        raise DataError(
            f"{where}: {key!r} in {os.fspath(path)!r} should be {count} integers in 0..{num - 1}"
            f", found {labels.dtype} {list(labels.shape)}. The file is damaged: download "
            f"{CIFAR100_ARCHIVE} again."
        )
    return labels.astype(np.int64)


def read_cifar100(
    root: str | os.PathLike[str],
    *,
    download: bool = False,
    verify: bool = True,
    url: str = CIFAR100_URL,
) -> Cifar100:
    """Read all of CIFAR-100 from the official archive, or its unpacked files, in ``root``.

    Args:
        root: the folder holding ``cifar-100-python.tar.gz`` or ``cifar-100-python/``.
        download: when ``root`` holds neither, fetch ``url`` into fmaml's cache.
        verify: check every file against its published md5 (False accepts a re-packed or
            modified copy).
        url: where to download from (a ``file://`` URL for a local mirror).

    Returns:
        :class:`Cifar100`, ``train`` then ``test``.

    Raises:
        DataError: a missing root or archive, a checksum mismatch (naming the file and both
            digests), a damaged or truncated file, a pickle that asks for anything but
            containers and arrays (refused unread), or contents not shaped like CIFAR-100's.
    """
    where = "read_cifar100()"
    folder = _find(Path(root).expanduser(), download, verify, url, where)
    meta = _read(folder / "meta", ("fine_label_names", "coarse_label_names"), where)
    fine_names = _names(meta["fine_label_names"], 100, folder / "meta", "fine_label_names", where)
    coarse_names = _names(
        meta["coarse_label_names"], 20, folder / "meta", "coarse_label_names", where
    )
    images, fine, coarse = [], [], []
    for name in ("train", "test"):
        path = folder / name
        part = _read(path, ("data", "fine_labels", "coarse_labels"), where)
        data = part["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            found = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else data
            raise DataError(
                f"{where}: 'data' in {os.fspath(path)!r} should be uint8 [N, 3072], found "
                f"{str(found)[:60]}. The file is damaged: download {CIFAR100_ARCHIVE} again."
            )
        if data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{where}: 'data' in {os.fspath(path)!r} should be uint8 [N, 3072], found "
                f"{list(data.shape)}. The file is damaged: download {CIFAR100_ARCHIVE} again."
            )
        images.append(data.reshape(-1, 3, 32, 32))
        fine.append(_labels(part["fine_labels"], len(data), 100, path, "fine_labels", where))
        coarse.append(_labels(part["coarse_labels"], len(data), 20, path, "coarse_labels", where))
    fine_all, coarse_all = np.concatenate(fine), np.concatenate(coarse)
    pairs = set(zip(fine_all.tolist(), coarse_all.tolist(), strict=True))
    if len(pairs) != len({f for f, _ in pairs}):
        raise DataError(
            f"{where}: in {os.fspath(folder)!r} some class has images in two superclasses; "
            f"in CIFAR-100 each class is in one. The files are damaged: download "
            f"{CIFAR100_ARCHIVE} again."
        )
    return Cifar100(
        np.concatenate(images),
        fine_all,
        coarse_all,
        fine_names,
        coarse_names,
        folder,
    )


def _check_names(found: tuple[str, ...], expected: set[str], what: str, where: str) -> None:
    if set(found) != expected:
        missing = sorted(expected - set(found))[:5]
        unexpected = sorted(set(found) - expected)[:5]
        raise DataError(
            f"{where}: the archive's {what} are not CIFAR-100's.\n  missing:    {missing}\n"
            f"  unexpected: {unexpected}\nUse the official {CIFAR100_ARCHIVE}."
        )


def _splits(
    data: Cifar100, classes: dict[str, list[int]], image_size: int, cache: bool
) -> dict[str, ClassImages]:
    """One :class:`ClassImages` per split from the fine class ids of each; groups = superclass."""
    images = data.images
    if image_size != 32:
        files = [data.folder / "train", data.folder / "test"]
        settings = f"{image_size}x{image_size}-RGB"

        def build() -> np.ndarray:
            return resize_images(data.images, image_size)

        images = cached_images(
            "cifar100",
            data.folder,
            files,
            settings,
            build,
            enabled=cache,
            num_images=len(data.images),
        )
    superclass = {int(f): int(c) for f, c in zip(data.fine, data.coarse, strict=True)}
    result = {}
    for split in SPLIT_NAMES:
        ids = sorted(classes[split], key=lambda i: data.fine_names[i])
        rows = [np.flatnonzero(data.fine == i) for i in ids]
        labels = torch.repeat_interleave(
            torch.arange(len(ids)), torch.tensor([len(r) for r in rows])
        )
        result[split] = ClassImages(
            torch.from_numpy(np.ascontiguousarray(images[np.concatenate(rows)])),
            labels,
            tuple(data.fine_names[i] for i in ids),
            tuple(data.coarse_names[superclass[i]] if i in superclass else None for i in ids),
        )
    return result


def load_cifarfs_splits(
    root: str | os.PathLike[str],
    *,
    image_size: int = 32,
    download: bool = False,
    verify: bool = True,
    url: str = CIFAR100_URL,
    cache: bool = True,
) -> dict[str, ClassImages]:
    """CIFAR-FS (Bertinetto et al., ICLR 2019): CIFAR-100's classes split 64 / 16 / 20.

    Args:
        root: the folder holding ``cifar-100-python.tar.gz`` or ``cifar-100-python/``.
        image_size: side of the images (32: as published; else resized with LANCZOS, cached).
        download: fetch the archive into fmaml's cache when ``root`` has none.
        verify: check files against their published md5.
        url: where to download from.
        cache: read and write the cache of resized images.

    Returns:
        ``{"train", "val", "test"}`` :class:`ClassImages`, 600 images per class, classes
        sorted by name, groups = superclass names.

    Raises:
        DataError: as :func:`read_cifar100`; class names that are not CIFAR-100's.

    Example:
        >>> splits = load_cifarfs_splits("data/cifar100")  # doctest: +SKIP
        >>> [splits[s].num_classes for s in ("train", "val", "test")]  # doctest: +SKIP
        [64, 16, 20]
    """
    where = "load_cifarfs_splits()"
    data = read_cifar100(root, download=download, verify=verify, url=url)
    published = published_split("cifarfs")
    expected = {n for names in published.values() for n in names}
    _check_names(data.fine_names, expected, "classes", where)
    index = {name: i for i, name in enumerate(data.fine_names)}
    classes = {split: [index[n] for n in names] for split, names in published.items()}
    return _splits(data, classes, image_size, cache)


def load_fc100_splits(
    root: str | os.PathLike[str],
    *,
    image_size: int = 32,
    download: bool = False,
    verify: bool = True,
    url: str = CIFAR100_URL,
    cache: bool = True,
) -> dict[str, ClassImages]:
    """FC100 (Oreshkin et al., NeurIPS 2018): CIFAR-100 split by superclass, 12 / 4 / 4.

    Args:
        root: the folder holding ``cifar-100-python.tar.gz`` or ``cifar-100-python/``.
        image_size: side of the images (32: as published; else resized with LANCZOS, cached).
        download: fetch the archive into fmaml's cache when ``root`` has none.
        verify: check files against their published md5.
        url: where to download from.
        cache: read and write the cache of resized images.

    Returns:
        ``{"train", "val", "test"}`` :class:`ClassImages` of 60 / 20 / 20 classes, 600 images
        each, classes sorted by name, groups = superclass names.

    Raises:
        DataError: as :func:`read_cifar100`; superclass names that are not CIFAR-100's.

    Example:
        >>> splits = load_fc100_splits("data/cifar100")  # doctest: +SKIP
        >>> [splits[s].num_classes for s in ("train", "val", "test")]  # doctest: +SKIP
        [60, 20, 20]
    """
    where = "load_fc100_splits()"
    data = read_cifar100(root, download=download, verify=verify, url=url)
    published = published_split("fc100")
    expected = {n for names in published.values() for n in names}
    _check_names(data.coarse_names, expected, "superclasses", where)
    index = {name: i for i, name in enumerate(data.coarse_names)}
    pairs = set(zip(data.fine.tolist(), data.coarse.tolist(), strict=True))
    classes = {
        split: sorted(f for f, c in pairs if c in {index[n] for n in names})
        for split, names in published.items()
    }
    return _splits(data, classes, image_size, cache)
