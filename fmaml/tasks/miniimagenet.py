"""mini-ImageNet (Vinyals et al. 2016) with Ravi & Larochelle's split: 64 / 16 / 20 classes.

Two layouts are read, detected per split:

* CSV: ``<root>/images/<file>.jpg`` and ``<root>/{train,val,test}.csv`` with the header
  ``filename,label`` (``label`` is the ImageNet id, e.g. ``n01532829``). Images are resized to
  ``image_size`` (default 84) with LANCZOS, once: the result is cached
  (:mod:`fmaml.tasks.cache`).
* pickle: ``<root>/mini-imagenet-cache-{train,val,test}.pkl``, each a dict with
  ``"image_data"``: uint8 ``[N, 84, 84, 3]`` and ``"class_dict"``: ``{label: [row, ...]}``.
  A pickle can name any Python function for the loader to call, so these files are read by
  :func:`fmaml.tasks.safe_pickle.read_array_pickle`, which builds only plain containers,
  strings, numbers and numeric numpy arrays and refuses anything else before it is called: a
  crafted file can't run code.

Either way the result is uint8 ``[N, 3, image_size, image_size]``; classes are sorted by label.
The data can't be downloaded automatically.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fmaml.tasks.cache import cached_images
from fmaml.tasks.images import SPLIT_NAMES, ClassImages, DataError, decode_images
from fmaml.tasks.safe_pickle import read_array_pickle

__all__ = ["load_miniimagenet", "load_miniimagenet_splits"]

_PICKLE = "mini-imagenet-cache-{split}.pkl"


def _layout_error(root: Path, split: str) -> DataError:
    return DataError(
        f"load_miniimagenet(): found neither {split}.csv nor {_PICKLE.format(split=split)} "
        f"in {os.fspath(root)!r}. Put mini-ImageNet there in one of two layouts: images/*.jpg "
        "with train.csv, val.csv, test.csv (header 'filename,label'), or the pickles "
        "mini-imagenet-cache-{train,val,test}.pkl. It can't be downloaded automatically."
    )


def _read_csv(root: Path, csv_path: Path) -> tuple[list[Path], list[str]]:
    """The image files and labels a split CSV names, checking every file is there."""
    where = "load_miniimagenet()"
    try:
        with csv_path.open(newline="") as stream:
            rows = list(csv.reader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(
            f"{where}: could not read {os.fspath(csv_path)!r} ({error}). "
            "Replace it with Ravi & Larochelle's CSV (header 'filename,label')."
        ) from error
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        header = rows[0] if rows else "nothing (empty file)"
        raise DataError(
            f"{where}: {os.fspath(csv_path)!r} should start with the header 'filename,label', "
            f"found {header}. Use Ravi & Larochelle's CSV files."
        )
    images = root / "images"
    files: list[Path] = []
    labels: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(
                f"{where}: line {line} of {os.fspath(csv_path)!r} is {row}, expected "
                "'filename,label'. Fix or delete that line."
            )
        path = images / row[0].strip()
        if not path.is_file():
            raise DataError(
                f"{where}: line {line} of {os.fspath(csv_path)!r} names {row[0].strip()!r}, "
                f"but {os.fspath(path)!r} does not exist. Put all images in "
                f"{os.fspath(images)!r}, or delete the line."
            )
        files.append(path)
        labels.append(row[1].strip())
    if not files:
        raise DataError(
            f"{where}: {os.fspath(csv_path)!r} lists no images. Use Ravi & Larochelle's CSV."
        )
    return files, labels


def _from_csv(root: Path, split: str, image_size: int, cache: bool) -> ClassImages:
    files, names = _read_csv(root, root / f"{split}.csv")
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([index[name] for name in names], dtype=torch.int64)

    def build() -> np.ndarray:
        return decode_images(files, image_size, "RGB")

    settings = f"{image_size}x{image_size}-RGB"
    images = cached_images(f"miniimagenet-{split}", root, files, settings, build, enabled=cache)
    return ClassImages(torch.from_numpy(images), labels, tuple(classes))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """``[N, H, W, 3]`` -> ``[N, size, size, 3]`` with LANCZOS."""
    return np.stack(
        [
            np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))
            for image in images
        ]
    )


def _from_pickle(path: Path, image_size: int) -> ClassImages:
    where = "load_miniimagenet()"
    stored = read_array_pickle(path, where=where)
    found = sorted(map(str, stored)) if isinstance(stored, Mapping) else type(stored).__name__
    if not isinstance(stored, Mapping) or not {"image_data", "class_dict"} <= set(stored):
        raise DataError(
            f"{where}: {os.fspath(path)!r} should hold a dict with keys 'image_data' and "
            f"'class_dict', found {found}. Use the mini-imagenet-cache-*.pkl files, or the CSV "
            "layout."
        )
    image_data = np.asarray(stored["image_data"])
    class_dict = stored["class_dict"]
    if image_data.dtype != np.uint8 or image_data.ndim != 4 or image_data.shape[-1] != 3:
        raise DataError(
            f"{where}: 'image_data' in {os.fspath(path)!r} should be uint8 [N, H, W, 3], found "
            f"{image_data.dtype} {list(image_data.shape)}. Use the mini-imagenet-cache-*.pkl "
            "files."
        )
    if not isinstance(class_dict, Mapping) or not class_dict:
        raise DataError(
            f"{where}: 'class_dict' in {os.fspath(path)!r} should map each label to its rows, "
            f"found {type(class_dict).__name__}. Use the mini-imagenet-cache-*.pkl files."
        )
    classes = sorted(class_dict, key=str)
    rows: list[np.ndarray] = []
    for name in classes:
        ids = np.asarray(class_dict[name]).reshape(-1)
        if (
            ids.size == 0
            or ids.dtype.kind not in "iu"
            or ids.min() < 0
            or (ids.max() >= len(image_data))
        ):
            raise DataError(
                f"{where}: class {name!r} in {os.fspath(path)!r} lists rows {ids[:5].tolist()}"
                f"..., expected integers in 0..{len(image_data) - 1}. The pickle is damaged: "
                "download it again."
            )
        rows.append(ids.astype(np.int64))
    labels = torch.repeat_interleave(
        torch.arange(len(classes)), torch.tensor([len(ids) for ids in rows])
    )
    images = image_data[np.concatenate(rows)]
    if images.shape[1:3] != (image_size, image_size):
        images = _resize(images, image_size)
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return ClassImages(torch.from_numpy(images), labels, tuple(str(c) for c in classes))


def load_miniimagenet(
    root: str | os.PathLike[str], split: str, *, image_size: int = 84, cache: bool = True
) -> ClassImages:
    """Load one split of mini-ImageNet from ``root`` (pickle layout first, else CSV layout).

    Args:
        root: the folder holding ``images/`` and the CSVs, or the pickles.
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: side of the resized images (MAML: 84).
        cache: read and write the decode-once cache (CSV layout; pickles hold arrays already).

    Returns:
        :class:`ClassImages` with images ``[N, 3, image_size, image_size]`` uint8, class names
        the labels (ImageNet ids), sorted; no groups.

    Raises:
        ValueError: an unknown ``split``.
        DataError: a missing root or split file, a bad CSV header or row, a CSV naming a
            missing image (named, with its line), an unreadable image (named), a pickle without
            ``image_data`` / ``class_dict`` or with bad contents.

    Example:
        >>> train = load_miniimagenet("data/miniimagenet", "train")  # doctest: +SKIP
        >>> train.num_classes, train.image_shape  # doctest: +SKIP
        (64, (3, 84, 84))
    """
    if split not in SPLIT_NAMES:
        raise ValueError(
            f"load_miniimagenet(): `split` must be one of {SPLIT_NAMES}, got {split!r}."
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"load_miniimagenet(): the data folder {os.fspath(root)!r} does not exist. "
            "Download mini-ImageNet by hand (images/ + train.csv, val.csv, test.csv, or the "
            "mini-imagenet-cache-*.pkl files) and pass its folder."
        )
    pickled = root / _PICKLE.format(split=split)
    if pickled.is_file():
        return _from_pickle(pickled, image_size)
    if (root / f"{split}.csv").is_file():
        return _from_csv(root, split, image_size, cache)
    raise _layout_error(root, split)


def load_miniimagenet_splits(
    root: str | os.PathLike[str], *, image_size: int = 84, cache: bool = True
) -> dict[str, ClassImages]:
    """All three splits: ``{"train": ..., "val": ..., "test": ...}`` via :func:`load_miniimagenet`.

    Raises:
        DataError: as :func:`load_miniimagenet`, for the first split that fails.
    """
    return {
        split: load_miniimagenet(root, split, image_size=image_size, cache=cache)
        for split in SPLIT_NAMES
    }
