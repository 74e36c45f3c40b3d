"""Your own images: ``<root>/<class>/<image>``, one sub-folder per class.

Any image PIL reads (``.png .jpg .jpeg .bmp .gif .webp .tif .tiff .ppm .pgm``, any case) of
any size is converted to ``channels`` (1 grey or 3 RGB) and resized to a square
``image_size`` (LANCZOS; the aspect ratio is not kept). Hidden files and folders and files
with other endings are ignored. The decoded images are cached (:mod:`fmaml.tasks.cache`).
Split the classes with :func:`fmaml.tasks.images.split_classes`, or through
``load_splits("folder", root, split="0.7,0.1,0.2")``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fmaml.errors import ConfigError
from fmaml.tasks.cache import cached_images
from fmaml.tasks.images import IMAGE_EXTENSIONS, ClassImages, DataError, decode_images

__all__ = ["load_folder"]


def load_folder(
    root: str | os.PathLike[str],
    *,
    image_size: int = 84,
    channels: int = 3,
    cache: bool = True,
) -> ClassImages:
    """Load ``<root>/<class>/<image>``: each sub-folder a class, named after the folder.

    Args:
        root: the folder holding one sub-folder per class.
        image_size: side of the square images.
        channels: 1 (grey) or 3 (RGB).
        cache: read and write the decode-once cache.

    Returns:
        :class:`ClassImages` with images ``[N, channels, image_size, image_size]`` uint8,
        classes sorted by folder name, no groups.

    Raises:
        ValueError: ``channels`` not 1 or 3, or a non-positive ``image_size``.
        DataError: a missing root, a root without class folders, a class folder without
            images, or an unreadable image (named).

    Example:
        >>> data = load_folder("my_images", image_size=64, channels=1)  # doctest: +SKIP
    """
    where = "load_folder()"
    if channels not in (1, 3):
        raise ConfigError(f"{where}: `channels` must be 1 (grey) or 3 (RGB), got {channels!r}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"{where}: `image_size` must be a positive int, got {image_size!r}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{where}: the data folder {os.fspath(root)!r} does not exist. Pass the folder "
            "that holds one sub-folder per class: <root>/<class>/<image>.jpg."
        )
    class_dirs = sorted(
        path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")
    )
    if not class_dirs:
        raise DataError(
            f"{where}: {os.fspath(root)!r} holds no class folders. Put each class's images in "
            "its own sub-folder: <root>/<class>/<image>.jpg."
        )
    files: list[Path] = []
    counts: list[int] = []
    for class_dir in class_dirs:
        images = sorted(
            path
            for path in class_dir.iterdir()
            if path.is_file()
            and not path.name.startswith(".")
            and path.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise DataError(
                f"{where}: the class folder {os.fspath(class_dir)!r} holds no images "
                f"({' '.join(IMAGE_EXTENSIONS)}). Add its images or remove the folder."
            )
        files.extend(images)
        counts.append(len(images))
    mode = "L" if channels == 1 else "RGB"

    def build() -> np.ndarray:
        return decode_images(files, image_size, mode)

    settings = f"{image_size}x{image_size}-{mode}"
    images = cached_images("folder", root, files, settings, build, enabled=cache)
    labels = torch.repeat_interleave(torch.arange(len(class_dirs)), torch.tensor(counts))
    return ClassImages(torch.from_numpy(images), labels, tuple(p.name for p in class_dirs))
