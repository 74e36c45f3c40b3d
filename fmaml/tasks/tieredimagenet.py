"""tiered-ImageNet (Ren et al., ICLR 2018): 608 ImageNet classes in 34 categories.

The categories are split 20 / 6 / 8 (351 / 97 / 160 classes), so that test classes are far
from the training ones; the release's files are the split. ``root`` holds, for each split
``train``, ``val`` and ``test``:

* ``{split}_labels.pkl``: a dict with ``label_specific`` (each image's class, indexing
  ``label_specific_str``, the class names) and, for the category of each class,
  ``label_general`` and ``label_general_str``;
* the images, in one of two layouts:

  - ``{split}_images_png.pkl`` (the public release): a list of PNG-encoded byte arrays, one per
    image, decoded once (84x84 RGB) and cached (:mod:`fmaml.tasks.cache`);
  - ``{split}_images.npz`` (the variant other repositories use): ``images``, uint8
    ``[N, 84, 84, 3]``.

The pickles are read by :func:`fmaml.tasks.safe_pickle.read_array_pickle`, so a crafted file
can't run code; the ``.npz`` by ``numpy.load`` with ``allow_pickle=False``. The data has no
stable official URL and can't be downloaded automatically.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fmaml.tasks.cache import cached_images
from fmaml.tasks.images import (
    SPLIT_NAMES,
    ClassImages,
    DataError,
    max_image_pixels,
    resize_images,
)
from fmaml.tasks.safe_pickle import read_array_pickle

__all__ = [
    "TIERED_CATEGORIES",
    "TIERED_CLASSES",
    "load_tieredimagenet",
    "load_tieredimagenet_splits",
]

TIERED_CLASSES = {"train": 351, "val": 97, "test": 160}
"""Classes per split in the release."""

TIERED_CATEGORIES = {"train": 20, "val": 6, "test": 8}
"""Categories (ImageNet's high-level nodes) per split in the release."""

_HELP = (
    "tiered-ImageNet has no stable download: get {split}_images_png.pkl and {split}_labels.pkl "
    "for train, val and test from Ren et al.'s release (github.com/renmengye/few-shot-ssl-"
    "public, the tiered-imagenet.tar archive it links to), or the {split}_images.npz variant, "
    "and put them all in {root!r}"
)


def _labels(path: Path, where: str) -> tuple[np.ndarray, list[str], list[str | None]]:
    """Each image's class, the class names, and each class's category (or None)."""
    stored = read_array_pickle(path, where=where)
    if isinstance(stored, Mapping):
        stored = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in stored.items()}
    if not isinstance(stored, dict) or not {"label_specific", "label_specific_str"} <= set(stored):
        found = sorted(map(str, stored)) if isinstance(stored, dict) else type(stored).__name__
        raise DataError(
            f"{where}: {os.fspath(path)!r} should hold a dict with 'label_specific' and "
            f"'label_specific_str' (and 'label_general', 'label_general_str'), found {found}. "
            "Use the release's labels pickle."
        )

    def text(values: object) -> list[str]:
        return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values or ()]

    names = text(stored["label_specific_str"])
    labels = np.asarray(stored["label_specific"])
    if (
        labels.ndim != 1
        or labels.dtype.kind not in "iu"
        or not names
        or (labels.size and (labels.min() < 0 or labels.max() >= len(names)))
    ):
        raise DataError(
            f"{where}: 'label_specific' in {os.fspath(path)!r} should be integers in "
            f"0..{len(names) - 1} (one per name in 'label_specific_str'), found {labels.dtype} "
            f"{list(labels.shape)}. The file is damaged: download it again."
        )
    groups: list[str | None] = [None] * len(names)
    general, general_names = stored.get("label_general"), text(stored.get("label_general_str"))
    if general is not None and general_names:
        general = np.asarray(general)
        if general.shape != labels.shape or general.dtype.kind not in "iu":
            raise DataError(
                f"{where}: 'label_general' in {os.fspath(path)!r} should hold one category per "
                f"image ({len(labels)}), found {general.dtype} {list(general.shape)}. The file "
                "is damaged: download it again."
            )
        for label, category in zip(labels.tolist(), general.tolist(), strict=True):
            if not 0 <= category < len(general_names):
                raise DataError(
                    f"{where}: 'label_general' in {os.fspath(path)!r} holds {category}, "
                    f"expected 0..{len(general_names) - 1}. The file is damaged."
                )
            groups[label] = general_names[category]
    return labels.astype(np.int64), names, groups


def _decode_png(blob: object, size: int, index: int, path: Path, where: str) -> np.ndarray:
    """One PNG byte array -> ``[size, size, 3]`` uint8 (LANCZOS when resized)."""
    if isinstance(blob, np.ndarray) and blob.dtype == np.uint8 and blob.ndim == 1:
        blob = blob.tobytes()
    if not isinstance(blob, bytes | bytearray):
        raise DataError(
            f"{where}: image {index} in {os.fspath(path)!r} should be PNG bytes (a uint8 array), "
            f"found {type(blob).__name__}. Use the release's *_images_png.pkl."
        )
    limit = max_image_pixels()
    try:
        with Image.open(io.BytesIO(blob)) as opened:
            width, height = opened.size
            if width * height > limit:
                raise DataError(
                    f"{where}: refused image {index} in {os.fspath(path)!r}: {width} x {height} "
                    f"pixels, more than the limit of {limit:,} (a decompression bomb?)."
                )
            image = opened.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8).copy()
    except DataError:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        UserWarning,
        Image.DecompressionBombError,
    ) as error:
        raise DataError(
            f"{where}: image {index} in {os.fspath(path)!r} is not a readable PNG ({error}). "
            "The file is damaged: download it again."
        ) from None


def _from_png_pickle(path: Path, count: int, size: int, where: str) -> np.ndarray:
    blobs = read_array_pickle(path, where=where)
    if not isinstance(blobs, list | tuple) or len(blobs) != count:
        found = f"{len(blobs)} items" if isinstance(blobs, list | tuple) else type(blobs).__name__
        raise DataError(
            f"{where}: {os.fspath(path)!r} should hold a list of {count} PNG images (one per "
            f"label), found {found}. The file is damaged or from another split: download it "
            "again."
        )
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda i: _decode_png(blobs[i], size, i, path, where), range(count)))
    if not images:
        return np.zeros((0, 3, size, size), dtype=np.uint8)
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))


def _from_npz(path: Path, count: int, where: str) -> np.ndarray:
    try:
        # np.load leaves a file it can't read open: open and close it here
        with open(path, "rb") as stream:
            stored = np.load(stream, allow_pickle=False)
            if not isinstance(stored, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with stored:
                images = stored["images"]
    except KeyError:
        raise DataError(
            f"{where}: {os.fspath(path)!r} holds no array 'images'. Use the *_images.npz files "
            "with images uint8 [N, 84, 84, 3], or the release's *_images_png.pkl."
        ) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as error:
        raise DataError(
            f"{where}: could not read {os.fspath(path)!r} ({type(error).__name__}: "
            f"{str(error)[:200]}). The file is truncated or damaged: download it again."
        ) from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"{where}: 'images' in {os.fspath(path)!r} should be uint8 [N, H, W, 3], found "
            f"{images.dtype} {list(images.shape)}. Use the *_images.npz files."
        )
    if len(images) != count:
        raise DataError(
            f"{where}: {os.fspath(path)!r} holds {len(images)} images but the labels pickle "
            f"{count} labels. The files are from different splits or damaged."
        )
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def load_tieredimagenet(
    root: str | os.PathLike[str], split: str, *, image_size: int = 84, cache: bool = True
) -> ClassImages:
    """Load one split of tiered-ImageNet from the release's files in ``root``.

    Args:
        root: the folder holding ``{split}_labels.pkl`` and ``{split}_images_png.pkl`` (or
            ``{split}_images.npz``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: side of the images (84: as released; else resized with LANCZOS).
        cache: read and write the cache of decoded images.

    Returns:
        :class:`ClassImages` with images ``[N, 3, image_size, image_size]`` uint8, classes in
        the release's order (``label_specific_str``; those without images left out), groups =
        categories (``label_general_str``).

    Raises:
        ValueError: an unknown ``split``.
        DataError: a missing root or file (saying which files to get and where to put them),
            a damaged or truncated file, a pickle that asks for anything but containers and
            arrays (refused unread), an unreadable PNG (named by its index), or labels and
            images that disagree.

    Example:
        >>> test = load_tieredimagenet("data/tieredimagenet", "test")  # doctest: +SKIP
        >>> test.num_classes  # doctest: +SKIP
        160
    """
    where = "load_tieredimagenet()"
    if split not in SPLIT_NAMES:
        raise ValueError(f"{where}: `split` must be one of {SPLIT_NAMES}, got {split!r}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{where}: the data folder {os.fspath(root)!r} does not exist. "
            + _HELP.format(split="{split}", root=os.fspath(root))
            + "."
        )
    labels_path = root / f"{split}_labels.pkl"
    png, npz = root / f"{split}_images_png.pkl", root / f"{split}_images.npz"
    if not labels_path.is_file() or not (png.is_file() or npz.is_file()):
        missing = labels_path.name if not labels_path.is_file() else png.name
        raise DataError(
            f"{where}: {missing} is not in {os.fspath(root)!r}. "
            + _HELP.format(split="{split}", root=os.fspath(root))
            + "."
        )
    labels, names, groups = _labels(labels_path, where)
    source = png if png.is_file() else npz
    settings = f"{image_size}x{image_size}-RGB"

    def build() -> np.ndarray:
        if source == png:
            return _from_png_pickle(png, len(labels), image_size, where)
        images = _from_npz(npz, len(labels), where)
        return images if images.shape[-1] == image_size else resize_images(images, image_size)

    images = cached_images(
        f"tieredimagenet-{split}",
        root,
        [source],
        settings,
        build,
        enabled=cache and (source == png or image_size != 84),
        num_images=len(labels),
    )
    present = np.unique(labels)
    relabel = np.full(len(names), -1, dtype=np.int64)
    relabel[present] = np.arange(len(present))
    return ClassImages(
        torch.from_numpy(images),
        torch.from_numpy(relabel[labels]),
        tuple(names[i] for i in present),
        tuple(groups[i] for i in present),
    )


def load_tieredimagenet_splits(
    root: str | os.PathLike[str], *, image_size: int = 84, cache: bool = True
) -> dict[str, ClassImages]:
    """All three splits via :func:`load_tieredimagenet`: 351 / 97 / 160 classes as released.

    Raises:
        DataError: as :func:`load_tieredimagenet`, for the first split that fails.
    """
    return {
        split: load_tieredimagenet(root, split, image_size=image_size, cache=cache)
        for split in SPLIT_NAMES
    }
