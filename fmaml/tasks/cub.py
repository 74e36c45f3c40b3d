"""CUB-200-2011 (Wah et al. 2011): 200 bird species, 11,788 photographs, few-shot split.

The few-shot split of Hilliard et al. (2018) and Chen et al. ("A Closer Look at Few-shot
Classification", ICLR 2019): the 200 class folders sorted by name, folder ``i`` (from 0) is
train when ``i % 2 == 0``, val when ``i % 4 == 1`` and test when ``i % 4 == 3``: 100 / 50 / 50
classes. The lists ship with fmaml (:mod:`fmaml.tasks.published`) and the folder names are
checked against them. ``root`` holds one of:

* ``CUB_200_2011/images/<class>/*.jpg`` (the unpacked archive), or ``images/<class>/*.jpg``
  (``root`` is the ``CUB_200_2011`` folder);
* ``CUB_200_2011.tgz``, the official archive: checked against its md5 and unpacked into
  fmaml's cache (:mod:`fmaml.tasks.archives`), never beside it.

Images are converted to RGB and resized to ``image_size`` (84, as Chen et al.) with LANCZOS
(the aspect ratio is not kept), once: the result is cached (:mod:`fmaml.tasks.cache`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fmaml.tasks.archives import check_md5, fetch, unpack
from fmaml.tasks.cache import cached_images
from fmaml.tasks.images import SPLIT_NAMES, ClassImages, DataError, decode_images
from fmaml.tasks.published import published_split

__all__ = ["CUB_ARCHIVE", "CUB_MD5", "CUB_URL", "load_cub", "load_cub_splits"]

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
"""The official archive on CaltechDATA."""

CUB_ARCHIVE = "CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
"""The archive's published md5."""


def _images_folder(root: Path, download: bool, verify: bool, url: str, where: str) -> Path:
    if not root.is_dir():
        raise DataError(
            f"{where}: the data folder {os.fspath(root)!r} does not exist. Create it and put "
            f"{CUB_ARCHIVE} (from {CUB_URL}) or its unpacked CUB_200_2011/ folder in it."
        )
    for folder in (root / "CUB_200_2011" / "images", root / "images"):
        if folder.is_dir():
            return folder
    archive = root / CUB_ARCHIVE
    if not archive.is_file():
        if not download:
            raise DataError(
                f"{where}: found neither CUB_200_2011/images/ nor {CUB_ARCHIVE} in "
                f"{os.fspath(root)!r}. Download {CUB_URL} and put it there, or pass "
                "download=True (CLI: --download) to fetch it into fmaml's cache."
            )
        archive = fetch(
            url,
            CUB_ARCHIVE,
            CUB_MD5 if verify else None,
            where=where,
            hint=f"download {CUB_ARCHIVE} by hand and put it in {os.fspath(root)!r}",
        )
    elif verify:
        check_md5(archive, CUB_MD5, where=where)
    folder = unpack(archive, where=where) / "CUB_200_2011" / "images"
    if not folder.is_dir():
        raise DataError(
            f"{where}: {os.fspath(archive)!r} does not hold CUB_200_2011/images/. Use the "
            f"official archive from {CUB_URL}."
        )
    return folder


def load_cub(
    root: str | os.PathLike[str],
    *,
    image_size: int = 84,
    download: bool = False,
    verify: bool = True,
    url: str = CUB_URL,
    cache: bool = True,
) -> ClassImages:
    """Load all 200 classes of CUB-200-2011, each class folder a class, sorted by name.

    Args:
        root: the folder holding ``CUB_200_2011/`` (or its ``images/``) or ``CUB_200_2011.tgz``.
        image_size: side of the resized images (84).
        download: when ``root`` holds neither, fetch ``url`` into fmaml's cache.
        verify: check the archive against its published md5 (False accepts a re-packed or
            modified copy; the unpacked folder has no published checksums).
        url: where to download from (a ``file://`` URL for a local mirror).
        cache: read and write the decode-once cache.

    Returns:
        :class:`ClassImages` with images ``[N, 3, image_size, image_size]`` uint8, class
        names the folder names (``"001.Black_footed_Albatross"``, ...), no groups.

    Raises:
        DataError: a missing root or archive, a checksum mismatch (naming the file and both
            digests), a damaged archive, class folders that are not CUB's 200 (listing the
            missing and unexpected ones), a class without images, an unreadable image (named).
    """
    where = "load_cub()"
    images_root = _images_folder(Path(root).expanduser(), download, verify, url, where)
    expected = {name for names in published_split("cub").values() for name in names}
    class_dirs = sorted(
        p for p in images_root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    found = {p.name for p in class_dirs}
    if found != expected:
        raise DataError(
            f"{where}: the class folders in {os.fspath(images_root)!r} are not CUB-200-2011's "
            f"200.\n  missing:    {sorted(expected - found)[:5]}\n  unexpected: "
            f"{sorted(found - expected)[:5]}\nUse the official archive's images/ folder, or "
            "the 'folder' dataset for other images."
        )
    files: list[Path] = []
    counts: list[int] = []
    for class_dir in class_dirs:
        images = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == ".jpg"
        )
        if not images:
            raise DataError(
                f"{where}: the class folder {os.fspath(class_dir)!r} holds no .jpg images. "
                "The data is incomplete: unpack the archive again."
            )
        files.extend(images)
        counts.append(len(images))

    def build() -> np.ndarray:
        return decode_images(files, image_size, "RGB")

    settings = f"{image_size}x{image_size}-RGB"
    images = cached_images("cub", images_root, files, settings, build, enabled=cache)
    labels = torch.repeat_interleave(torch.arange(len(class_dirs)), torch.tensor(counts))
    return ClassImages(torch.from_numpy(images), labels, tuple(p.name for p in class_dirs))


def load_cub_splits(
    root: str | os.PathLike[str],
    *,
    image_size: int = 84,
    download: bool = False,
    verify: bool = True,
    url: str = CUB_URL,
    cache: bool = True,
) -> dict[str, ClassImages]:
    """CUB-200-2011's few-shot split (Chen et al., ICLR 2019): 100 / 50 / 50 classes.

    Args:
        root, image_size, download, verify, url, cache: as :func:`load_cub`.

    Returns:
        ``{"train", "val", "test"}`` :class:`ClassImages`.

    Raises:
        DataError: as :func:`load_cub`.

    Example:
        >>> splits = load_cub_splits("data/cub")  # doctest: +SKIP
        >>> [splits[s].num_classes for s in ("train", "val", "test")]  # doctest: +SKIP
        [100, 50, 50]
    """
    data = load_cub(
        root, image_size=image_size, download=download, verify=verify, url=url, cache=cache
    )
    index = {name: i for i, name in enumerate(data.class_names)}
    published = published_split("cub")
    return {split: data.subset([index[n] for n in published[split]]) for split in SPLIT_NAMES}
