"""Few-shot episodes over class-labelled images: the container, splits and the sampler.

Everything here works on :class:`ClassImages`, a set of uint8 images ``[N, C, H, W]`` with
integer class labels. The loaders (:mod:`fmaml.tasks.omniglot`,
:mod:`fmaml.tasks.miniimagenet`, :mod:`fmaml.tasks.folder`) build one;
:func:`fmaml.tasks.datasets.load_splits` builds the train / val / test sets the command line
uses; :class:`EpisodeSampler` turns a set
into meta-batches of N-way K-shot tasks, a whole meta-batch at a time, with no Python loop
over tasks.

Randomness always comes from a ``torch.Generator`` passed in; nothing here seeds or reads the
global random state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fmaml.errors import ConfigError, InputError, check_positive_int
from fmaml.types import Task

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "SPLIT_NAMES",
    "ClassImages",
    "DataError",
    "EmptySplitData",
    "EpisodeSampler",
    "EpisodeSpec",
    "decode_image",
    "decode_images",
    "fixed_episodes",
    "max_image_pixels",
    "parse_fractions",
    "split_classes",
    "split_groups",
]

SPLIT_NAMES = ("train", "val", "test")
"""The keys of a split dict. ``"val"`` is absent when the validation split is empty."""

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
"""File endings (compared case-insensitively) that the loaders read as images."""


class DataError(InputError):
    """Data on disk (or in memory) that can't be used as it is: the message says what to do."""


class EmptySplitData(DataError):
    """A split rule that leaves the train or test split without classes.

    Args:
        message: the whole message.
        counts: ``{"train": n, "val": n, "test": n}``, what the rule gives each split.
        unit: what was counted: ``"classes"``, or ``"groups"`` (Omniglot: alphabets).
        fractions: the rule's ``(train, val, test)`` proportions.
    """

    def __init__(self, message: str, counts: dict[str, int], unit: str, fractions: tuple):
        super().__init__(message)
        self.counts, self.unit, self.fractions = dict(counts), unit, tuple(fractions)

    def __reduce__(self):  # keep the fields when pickled (e.g. sent between ranks)
        return (type(self), (str(self), self.counts, self.unit, self.fractions))


MAX_IMAGE_PIXELS_ENV = "FMAML_MAX_IMAGE_PIXELS"
"""Environment variable that overrides :data:`MAX_IMAGE_PIXELS`."""

MAX_IMAGE_PIXELS = 64_000_000
"""The largest image (width x height) the loaders decode: 8,000 x 8,000 pixels.

A small compressed file can claim a huge image (a decompression bomb: a 100 kB PNG may
decode to gigabytes). The loaders read each image's size from its header first and refuse
larger ones; ``$FMAML_MAX_IMAGE_PIXELS`` sets another limit. Few-shot datasets are far below
it (Omniglot 105 x 105, ImageNet photos a few megapixels).
"""


def max_image_pixels() -> int:
    """The pixel limit in force: ``$FMAML_MAX_IMAGE_PIXELS`` if set, else the default.

    Raises:
        DataError: the variable is set to something other than a positive integer.
    """
    configured = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not configured:
        return MAX_IMAGE_PIXELS
    if not configured.isdigit() or int(configured) < 1:
        raise DataError(
            f"${MAX_IMAGE_PIXELS_ENV} must be a positive number of pixels, got "
            f"{configured!r}. Unset it for the default ({MAX_IMAGE_PIXELS:,})."
        )
    return int(configured)


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False, eq=False)
class ClassImages:
    """Class-labelled images, immutable: the input to splits and to :class:`EpisodeSampler`.

    Images are stored once, as uint8, on one device; episodes index into them. Labels are
    ``0 .. num_classes - 1`` and every label names an entry of ``class_names`` and ``groups``.

    Attributes:
        images: ``[N, C, H, W]`` uint8. Omniglot is stored inverted (strokes = 255).
        labels: ``[N]`` int64, values in ``0 .. num_classes - 1``.
        class_names: one name per class, e.g. ``"Greek/character01"`` or ``"n01532829"``.
        groups: one entry per class: the class's group (Omniglot: its alphabet) or ``None``.

    Raises:
        ValueError: at construction, when shapes, dtypes, devices or lengths disagree.

    Example:
        >>> import torch
        >>> data = ClassImages(torch.zeros(6, 1, 4, 4, dtype=torch.uint8),
        ...                    torch.tensor([0, 0, 1, 1, 2, 2]), ("a", "b", "c"))
        >>> data.num_classes, data.subset([2, 0]).class_names
        (3, ('c', 'a'))
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    groups: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = (
                f"{images.dtype} {tuple(images.shape)}"
                if isinstance(images, Tensor)
                else type(images).__name__
            )
            raise ValueError(
                f"ClassImages(): `images` must be a uint8 tensor [N, C, H, W], got {got}. "
                "Convert with `torch.as_tensor(array, dtype=torch.uint8)` and permute to "
                "channels-first."
            )
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            got = (
                f"{labels.dtype} {tuple(labels.shape)}"
                if isinstance(labels, Tensor)
                else type(labels).__name__
            )
            raise ValueError(
                f"ClassImages(): `labels` must be an int64 tensor [N], got {got}. "
                "Build it with `torch.as_tensor(labels, dtype=torch.int64)`."
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"ClassImages(): {images.shape[0]} images but {labels.shape[0]} labels. "
                "Give one label per image."
            )
        if labels.device != images.device:
            raise ValueError(
                f"ClassImages(): images are on {images.device} but labels on {labels.device}. "
                "Move both with `.to(device)`."
            )
        names = tuple(str(name) for name in self.class_names)
        object.__setattr__(self, "class_names", names)
        groups = (None,) * len(names) if self.groups is None else tuple(self.groups)
        if len(groups) != len(names):
            raise ValueError(
                f"ClassImages(): {len(names)} class names but {len(groups)} groups. "
                "Give one group per class (or None)."
            )
        object.__setattr__(self, "groups", groups)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
            raise ValueError(
                f"ClassImages(): labels must lie in 0..{len(names) - 1} (one per class name), "
                f"got values from {int(labels.min())} to {int(labels.max())}. "
                "Relabel the classes 0..num_classes-1."
            )

    @property
    def num_classes(self) -> int:
        """The number of classes, ``len(class_names)``."""
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        """The device the images live on."""
        return self.images.device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        channels, height, width = self.images.shape[1:]
        return (int(channels), int(height), int(width))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ClassImages(num_classes={self.num_classes}, num_images={len(self)}, "
            f"image_shape={self.image_shape}, device={self.device})"
        )

    def class_sizes(self) -> Tensor:
        """The number of images of each class: ``[num_classes]`` int64 on :attr:`device`."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def to(self, device: torch.device | str) -> ClassImages:
        """The same images and labels on ``device`` (a new container; this one is unchanged)."""
        return ClassImages(
            self.images.to(device), self.labels.to(device), self.class_names, self.groups
        )

    def subset(self, class_ids: Sequence[int] | Tensor) -> ClassImages:
        """The images of the given classes, relabelled ``0 .. k-1`` in the order given.

        Args:
            class_ids: ``k`` distinct class indices in ``0 .. num_classes - 1``.

        Returns:
            A new :class:`ClassImages` with ``k`` classes; images keep their relative order.

        Raises:
            ValueError: a class index out of range or repeated.
        """
        ids = [int(i) for i in (class_ids.tolist() if isinstance(class_ids, Tensor) else class_ids)]
        bad = [i for i in ids if not 0 <= i < self.num_classes]
        if bad:
            raise ValueError(
                f"ClassImages.subset(): class ids must lie in 0..{self.num_classes - 1}, "
                f"got {bad[:5]}. Pick classes of this set."
            )
        if len(set(ids)) != len(ids):
            raise ValueError(
                "ClassImages.subset(): class ids must be distinct, got repeats in "
                f"{sorted(i for i in set(ids) if ids.count(i) > 1)[:5]}. Pass each class once."
            )
        relabel = torch.full((self.num_classes,), -1, dtype=torch.int64, device=self.device)
        relabel[torch.as_tensor(ids, dtype=torch.int64, device=self.device)] = torch.arange(
            len(ids), device=self.device
        )
        new_labels = relabel[self.labels]
        keep = new_labels >= 0
        return ClassImages(
            self.images[keep],
            new_labels[keep],
            tuple(self.class_names[i] for i in ids),
            tuple(self.groups[i] for i in ids),  # type: ignore[index]
        )


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def decode_image(path: str | os.PathLike[str], size: int, mode: str) -> np.ndarray:
    """Read one image file, convert it to ``mode`` and resize it to ``size x size`` (LANCZOS).

    Pure apart from reading the file. Aspect ratio is not kept: every image becomes square.

    Args:
        path: an image file PIL can read.
        size: the side of the output in pixels.
        mode: ``"L"`` (grey, 1 channel) or ``"RGB"`` (3 channels).

    Returns:
        ``[size, size]`` (mode ``"L"``) or ``[size, size, 3]`` (mode ``"RGB"``) uint8 array.

    Raises:
        DataError: the file is missing, unreadable, truncated or not an image, or larger than
            :func:`max_image_pixels` (a decompression bomb); the message names the file.
    """
    limit = max_image_pixels()
    try:
        with Image.open(path) as opened:
            width, height = opened.size  # from the header: nothing is decoded yet
            if width * height > limit:
                raise DataError(
                    f"decode_image(): refused the image {os.fspath(path)!r}: it is {width} x "
                    f"{height} = {width * height:,} pixels, more than the limit of {limit:,} "
                    "(a file this large may be a decompression bomb). Shrink the image, or "
                    f"raise the limit with ${MAX_IMAGE_PIXELS_ENV}."
                )
            opened.load()
            image = opened
            if image.mode in ("P", "PA"):
                # Palette images may carry transparency; go through RGBA so PIL keeps it honest.
                image = image.convert("RGBA")
            if image.mode != mode:
                image = image.convert(mode)
            image = image.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8).copy()
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # PIL's own, larger limit, met while reading the header (a warning where warnings
        # are errors): refused alike
        raise DataError(
            f"decode_image(): refused the image {os.fspath(path)!r}: {error} (fmaml's limit "
            f"is {limit:,} pixels). Shrink the image, or raise the limit with "
            f"${MAX_IMAGE_PIXELS_ENV}."
        ) from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        UserWarning,  # PIL warns of damaged metadata; raised only where warnings are errors
    ) as error:
        raise DataError(
            f"decode_image(): could not read the image {os.fspath(path)!r} ({error}). "
            "The file is unreadable, truncated or not an image: replace it or delete it."
        ) from error


def decode_images(
    paths: Sequence[str | os.PathLike[str]],
    size: int,
    mode: str,
    *,
    num_workers: int | None = None,
) -> np.ndarray:
    """Decode many image files with :func:`decode_image` on a thread pool.

    Args:
        paths: ``N`` image files.
        size: the side of every output image.
        mode: ``"L"`` or ``"RGB"``.
        num_workers: threads; default ``min(8, os.cpu_count())``.

    Returns:
        ``[N, C, size, size]`` uint8, channels-first, in the order of ``paths``.

    Raises:
        DataError: from :func:`decode_image`, naming the first bad file.
    """
    channels = 1 if mode == "L" else 3
    if not paths:
        return np.zeros((0, channels, size, size), dtype=np.uint8)
    workers = num_workers or min(8, os.cpu_count() or 1)

    def one(path: str | os.PathLike[str]) -> np.ndarray:
        # Looked up at call time so tests can count decodes by patching `decode_image`.
        return decode_image(path, size, mode)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(one, paths))
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        return stacked[:, None]
    return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize decoded images to ``size x size`` with LANCZOS, as the decoders do.

    Args:
        images: ``[N, C, H, W]`` uint8, ``C`` 1 or 3.
        size: the side of the output.

    Returns:
        ``[N, C, size, size]`` uint8.
    """
    if images.shape[-2:] == (size, size):
        return images
    resized = [
        np.asarray(
            Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).resize(
                (size, size), Image.Resampling.LANCZOS
            )
        )
        for image in images
    ]
    stacked = np.stack(resized) if resized else np.zeros((0, size, size, 3), np.uint8)
    if stacked.ndim == 3:
        return stacked[:, None]
    return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def parse_fractions(text: str, *, where: str = "parse_fractions()") -> tuple[float, float, float]:
    """Parse ``"train,val,test"`` proportions, e.g. ``"0.7,0.1,0.2"``.

    Args:
        text: three non-negative numbers separated by commas, summing to 1.
        where: the caller's name, used in the error message.

    Returns:
        ``(train, val, test)`` as floats.

    Raises:
        ConfigError: (a ``ValueError``) not three numbers, a negative one, or a sum other
            than 1.

    Example:
        >>> parse_fractions("0.75,0,0.25")
        (0.75, 0.0, 0.25)
    """
    parts = [part.strip() for part in text.split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(
            f"{where}: expected three non-negative proportions 'train,val,test' such as "
            f"'0.7,0.1,0.2', got {text!r}."
        )
    if abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(
            f"{where}: the proportions {text!r} sum to {sum(values):g}, not 1. "
            "Rescale them, e.g. '0.7,0.1,0.2'."
        )
    return values  # type: ignore[return-value]


def split_counts(num_items: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``num_items * fractions`` to integers that sum to it."""
    exact = [num_items * f for f in fractions]
    counts = [math.floor(x + 1e-9) for x in exact]
    short = num_items - sum(counts)
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:short]:
        counts[i] += 1
    return counts


def _check_fractions(fractions: Sequence[float], where: str) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ConfigError(
            f"{where}: expected three proportions (train, val, test), got {tuple(fractions)}."
        )
    return parse_fractions(",".join(repr(float(f)) for f in fractions), where=where)


def _assign(
    data: ClassImages,
    item_classes: list[list[int]],
    fractions: Sequence[float],
    generator: torch.Generator,
    unit: str,
    where: str,
) -> dict[str, ClassImages]:
    """Shuffle ``items`` (each a list of class ids), cut them by ``fractions``, build subsets."""
    counts = split_counts(len(item_classes), fractions)
    for name, count in zip(SPLIT_NAMES, counts, strict=True):
        if name != "val" and count == 0:
            given = ", ".join(f"{n} {c}" for n, c in zip(SPLIT_NAMES, counts, strict=True))
            raise EmptySplitData(
                f"{where}: splitting {len(item_classes)} {unit} by {tuple(fractions)} gives "
                f"{given} {unit}: the {name} split is empty. A task draws all its classes "
                f"from one split, so train and test each need at least as many classes as a "
                f"task has ways; use data with more {unit}.",
                dict(zip(SPLIT_NAMES, counts, strict=True)),
                unit,
                tuple(fractions),
            )
    order = torch.randperm(len(item_classes), generator=generator).tolist()
    splits: dict[str, ClassImages] = {}
    start = 0
    for name, count in zip(SPLIT_NAMES, counts, strict=True):
        chosen = order[start : start + count]
        start += count
        if count == 0:
            continue
        class_ids = sorted(c for item in chosen for c in item_classes[item])
        splits[name] = data.subset(class_ids)
    return splits


def split_classes(
    data: ClassImages, fractions: Sequence[float], generator: torch.Generator
) -> dict[str, ClassImages]:
    """Split by class: each class goes, whole, to one of train / val / test.

    The classes are shuffled with ``generator`` and cut by ``fractions`` (largest-remainder
    rounding, so the counts sum to ``num_classes``). Deterministic given the generator's state;
    the splits are disjoint in classes and each is relabelled ``0 .. k-1`` (in the original
    class order).

    Args:
        data: the classes to split.
        fractions: ``(train, val, test)`` proportions, non-negative, summing to 1.
        generator: a CPU ``torch.Generator``, e.g. ``torch.Generator().manual_seed(0)``.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``; ``"val"`` is **absent** when it gets no
        class (e.g. ``fractions=(0.8, 0, 0.2)``).

    Raises:
        ValueError: bad fractions.
        DataError: the train or test split would be empty.

    Example:
        >>> import torch
        >>> data = ClassImages(torch.zeros(10, 1, 2, 2, dtype=torch.uint8),
        ...                    torch.arange(10), tuple("abcdefghij"))
        >>> parts = split_classes(data, (0.6, 0.2, 0.2), torch.Generator().manual_seed(0))
        >>> {name: part.num_classes for name, part in parts.items()}
        {'train': 6, 'val': 2, 'test': 2}
    """
    where = "split_classes()"
    fractions = _check_fractions(fractions, where)
    items = [[c] for c in range(data.num_classes)]
    return _assign(data, items, fractions, generator, "classes", where)


def split_groups(
    data: ClassImages, fractions: Sequence[float], generator: torch.Generator
) -> dict[str, ClassImages]:
    """Split by group (Omniglot: by alphabet): all classes of a group go to the same split.

    The distinct groups are sorted by name, shuffled with ``generator`` and cut by
    ``fractions`` (largest-remainder rounding over groups, not classes). Deterministic given the
    generator's state; the splits are disjoint in groups.

    Args:
        data: classes that all have a group.
        fractions: ``(train, val, test)`` proportions of the groups.
        generator: a CPU ``torch.Generator``.

    Returns:
        ``{"train", "val", "test"}`` -> :class:`ClassImages`; ``"val"`` absent when empty.

    Raises:
        ValueError: bad fractions.
        DataError: classes without a group, or an empty train or test split.

    Example:
        >>> import torch
        >>> data = ClassImages(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4),
        ...                    ("a1", "a2", "b1", "c1"), ("a", "a", "b", "c"))
        >>> parts = split_groups(data, (0.34, 0, 0.66), torch.Generator().manual_seed(0))
        >>> sorted(parts), sum(p.num_classes for p in parts.values())
        (['test', 'train'], 4)
    """
    where = "split_groups()"
    fractions = _check_fractions(fractions, where)
    assert data.groups is not None  # filled in by __post_init__
    missing = [
        name for name, group in zip(data.class_names, data.groups, strict=True) if group is None
    ]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} classes have no group (e.g. {missing[:3]}), so they "
            "can't be split by group. Split by class instead (split_classes)."
        )
    names = sorted({str(group) for group in data.groups})
    members = [[c for c, group in enumerate(data.groups) if group == name] for name in names]
    return _assign(data, members, fractions, generator, "groups", where)


# --------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------


class EpisodeSpec(NamedTuple):
    """Which images make each task of a meta-batch: a description, cheap to draw and to slice.

    Every rank of a distributed run can draw the same spec from the same generator state and
    gather only its own slice of tasks: ``sampler.gather(spec.slice(a, b))`` equals
    ``sampler.gather(spec)`` restricted to tasks ``a:b``.

    Attributes:
        classes: ``[T, num_ways]`` int64 class ids; position ``j`` becomes label ``j``.
        indices: ``[T, num_ways, num_shots + num_query]`` int64 rows of ``data.images``; the
            first ``num_shots`` of each class are support, the rest query.
        rotations: ``[T, num_ways]`` int64 in ``0..3``, quarter turns applied to all images of
            that class in that task (zeros when the sampler doesn't rotate).
    """

    classes: Tensor
    indices: Tensor
    rotations: Tensor

    @property
    def num_tasks(self) -> int:
        """``T``, the number of tasks described."""
        return int(self.classes.shape[0])

    def slice(self, start: int, stop: int | None = None) -> EpisodeSpec:
        """Tasks ``start:stop`` (Python slice semantics) of this spec."""
        return EpisodeSpec(*(field[start:stop] for field in self))

    def shard(self, rank: int, world_size: int) -> EpisodeSpec:
        """Rank ``rank``'s contiguous share of the tasks, for ``world_size`` ranks.

        Raises:
            ValueError: ``num_tasks`` not divisible by ``world_size`` or ``rank`` out of range.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"EpisodeSpec.shard(): need 0 <= rank < world_size, got rank={rank}, "
                f"world_size={world_size}."
            )
        if self.num_tasks % world_size:
            raise ValueError(
                f"EpisodeSpec.shard(): {self.num_tasks} tasks don't divide among {world_size} "
                "ranks. Use a meta-batch size that is a multiple of the number of ranks."
            )
        per_rank = self.num_tasks // world_size
        return self.slice(rank * per_rank, (rank + 1) * per_rank)

    def to(self, device: torch.device | str) -> EpisodeSpec:
        """The same spec on ``device``."""
        return EpisodeSpec(*(field.to(device) for field in self))


class EpisodeSampler:
    """Draws meta-batches of N-way K-shot classification tasks from a :class:`ClassImages`.

    A whole meta-batch is drawn at once with tensor operations (no Python loop over tasks), on
    the data's device. Within a task the ``num_ways`` classes are distinct and drawn in random
    order (so the label given to a class is random per task), and the support and query images
    of a class are distinct images. Classes may hold different numbers of images. With
    ``rotate=True`` each class of each task is turned by a random multiple of 90 degrees
    (the MAML Omniglot protocol, applied at test time too).

    With ``within_groups=True`` every task takes all its classes from one group
    (``data.groups``; for Omniglot an alphabet: Lake et al.'s within-alphabet protocol, whose
    classes look alike). Each task's group is drawn uniformly from the groups that hold at
    least ``num_ways`` classes; the smaller ones are skipped and listed in
    :attr:`skipped_groups`.

    The sampler holds no random state: every draw takes a ``torch.Generator``.

    Args:
        data: the images to draw from; the sampler works on ``data.device``.
        num_ways: classes per task (N).
        num_shots: support images per class (K).
        num_query: query images per class.
        rotate: draw a rotation in ``{0, 90, 180, 270}`` degrees per class per task (square
            images only).
        dtype: floating dtype of the images :meth:`gather` returns (values in ``[0, 1]``).
        within_groups: draw the classes of each task from one group (see above).

    Attributes:
        groups: with ``within_groups``, ``{group: number of classes}`` of the groups drawn
            from; else ``{}``.
        skipped_groups: with ``within_groups``, ``{group: number of classes}`` of the groups
            with fewer than ``num_ways`` classes, which no task uses; else ``{}``.

    Raises:
        ValueError: a non-positive ``num_ways``, ``num_shots`` or ``num_query``; ``rotate``
            with non-square images.
        DataError: fewer classes than ``num_ways``, or a class with fewer than
            ``num_shots + num_query`` images; with ``within_groups``, classes without a group,
            or no group with ``num_ways`` classes.

    Example:
        >>> import torch
        >>> data = ClassImages(torch.zeros(30, 1, 8, 8, dtype=torch.uint8),
        ...                    torch.arange(30) % 6, tuple("abcdef"))
        >>> sampler = EpisodeSampler(data, num_ways=5, num_shots=1, num_query=2, rotate=True)
        >>> task = sampler.sample(4, torch.Generator().manual_seed(0))
        >>> task.support[0].shape, task.query[1].shape
        (torch.Size([4, 5, 1, 8, 8]), torch.Size([4, 10]))
    """

    def __init__(
        self,
        data: ClassImages,
        num_ways: int,
        num_shots: int,
        num_query: int,
        *,
        rotate: bool = False,
        dtype: torch.dtype = torch.float32,
        within_groups: bool = False,
    ) -> None:
        where = "EpisodeSampler()"
        self.num_ways = check_positive_int(num_ways, "num_ways", where)
        self.num_shots = check_positive_int(num_shots, "num_shots", where)
        self.num_query = check_positive_int(num_query, "num_query", where)
        if not dtype.is_floating_point:
            raise ValueError(f"{where}: `dtype` must be a floating dtype, got {dtype}.")
        _, height, width = data.image_shape
        if rotate and height != width:
            raise ValueError(
                f"{where}: rotate=True needs square images, got {height}x{width}. "
                "Resize the images to a square or pass rotate=False."
            )
        if data.num_classes < num_ways:
            raise DataError(
                f"{where}: {num_ways}-way tasks need at least {num_ways} classes, but this "
                f"split has {data.num_classes}. Lower --ways (num_ways) or choose a split with "
                "more classes."
            )
        per_class = num_shots + num_query
        sizes = data.class_sizes().cpu()
        short = (sizes < per_class).nonzero().flatten().tolist()
        if short:
            smallest = min(short, key=lambda c: int(sizes[c]))
            raise DataError(
                f"{where}: each class needs num_shots + num_query = {num_shots} + {num_query} "
                f"= {per_class} images, but {len(short)} of {data.num_classes} classes have "
                f"fewer (e.g. {data.class_names[smallest]!r} has {int(sizes[smallest])}). "
                "Lower --shots/--query or choose another split."
            )
        self.data = data
        self.rotate = bool(rotate)
        self.dtype = dtype
        self.within_groups = bool(within_groups)
        self.groups: dict[str, int] = {}
        self.skipped_groups: dict[str, int] = {}
        device = data.device
        if self.within_groups:
            self._group_of_class, self._group_ids = self._eligible_groups(where)
        # table[c, i] is the row of the i-th image of class c; rows past sizes[c] are padding.
        order = torch.argsort(data.labels, stable=True)
        sizes_dev = sizes.to(device)
        starts = torch.cumsum(sizes_dev, 0) - sizes_dev
        max_size = int(sizes.max())
        slot = torch.arange(max_size, device=device)
        positions = (starts[:, None] + slot).clamp(max=max(len(data) - 1, 0))
        self._valid = slot < sizes_dev[:, None]
        self._table = torch.where(self._valid, order[positions], torch.zeros_like(positions))
        # uint8 -> [0, 1] off the CPU by table lookup: v / 255 rounded once, as on the CPU
        # (CUDA's `x / 255` multiplies by a rounded reciprocal and can differ by an ulp).
        self._to_unit = (torch.arange(256, dtype=torch.float64) / 255).to(dtype).to(device)
        if self.rotate:
            base = torch.arange(height * width, device=device).view(height, width)
            self._rotation_index = torch.stack(
                [torch.rot90(base, k, dims=(0, 1)).flatten() for k in range(4)]
            )

    def _eligible_groups(self, where: str) -> tuple[Tensor, Tensor]:
        """``(group index of each class [num_classes], indices of the usable groups)``."""
        groups = self.data.groups or ()
        ungrouped = [
            name for name, g in zip(self.data.class_names, groups, strict=True) if g is None
        ]
        if ungrouped:
            raise DataError(
                f"{where}: within_groups=True (--within-alphabet) draws each task's classes "
                f"from one group (an Omniglot alphabet), but {len(ungrouped)} of "
                f"{self.data.num_classes} classes have no group (e.g. {ungrouped[0]!r}). Use "
                "Omniglot's <alphabet>/<character>/ layout, or drop --within-alphabet."
            )
        names = sorted({str(g) for g in groups})
        index = {name: i for i, name in enumerate(names)}
        group_of_class = torch.tensor([index[str(g)] for g in groups], dtype=torch.int64)
        sizes = torch.bincount(group_of_class, minlength=len(names)).tolist()
        self.groups = {n: k for n, k in zip(names, sizes, strict=True) if k >= self.num_ways}
        self.skipped_groups = {n: k for n, k in zip(names, sizes, strict=True) if k < self.num_ways}
        if not self.groups:
            listing = ", ".join(f"{n} {k}" for n, k in zip(names, sizes, strict=True))
            raise DataError(
                f"{where}: within-group (within-alphabet) {self.num_ways}-way tasks need a "
                f"group with at least {self.num_ways} classes, but the largest has "
                f"{max(sizes)} ({listing}). Lower --ways to {max(sizes)} or less, or choose a "
                "split whose alphabets are larger."
            )
        usable = torch.tensor([index[n] for n in self.groups], dtype=torch.int64)
        return group_of_class.to(self.device), usable.to(self.device)

    @property
    def device(self) -> torch.device:
        """The device of the data, of the specs drawn and of the tasks gathered."""
        return self.data.device

    def describe(self, num_tasks: int, generator: torch.Generator) -> EpisodeSpec:
        """Draw the description of ``num_tasks`` tasks: classes, images and rotations.

        The random numbers come from ``generator`` only. A generator on the data's device is the
        fast path; a CPU generator also works for data on an accelerator and then gives the
        same spec on every device (:func:`fixed_episodes` uses this).

        Args:
            num_tasks: ``T``, the meta-batch size.
            generator: a ``torch.Generator`` on the CPU or on :attr:`device`.

        Returns:
            An :class:`EpisodeSpec` on :attr:`device`.

        Raises:
            ValueError: non-positive ``num_tasks``; a generator on another accelerator.
        """
        where = "EpisodeSampler.describe()"
        num_tasks = check_positive_int(num_tasks, "num_tasks", where)
        draw_on = generator.device
        if draw_on.type != "cpu" and not _same_device(draw_on, self.device):
            raise ValueError(
                f"{where}: the generator is on {draw_on} but the data on {self.device}. "
                f"Pass `torch.Generator(device={str(self.device)!r})` or a CPU generator."
            )
        per_class = self.num_shots + self.num_query
        # float64 keys: ties between uniform draws are then vanishingly rare, so the order
        # (and the spec) is the same whichever device sorts them.
        class_keys = torch.rand(
            num_tasks,
            self.data.num_classes,
            generator=generator,
            device=draw_on,
            dtype=torch.float64,
        ).to(self.device)
        if self.within_groups:
            # one group per task; classes of other groups get keys below every uniform draw
            pick = torch.randint(
                0, len(self._group_ids), (num_tasks,), generator=generator, device=draw_on
            ).to(self.device)
            chosen = self._group_ids[pick]
            same = self._group_of_class[None, :] == chosen[:, None]
            class_keys = torch.where(same, class_keys, -1.0)
        classes = class_keys.topk(self.num_ways, dim=1).indices
        image_keys = torch.rand(
            num_tasks,
            self.num_ways,
            self._table.shape[1],
            generator=generator,
            device=draw_on,
            dtype=torch.float64,
        ).to(self.device)
        image_keys = torch.where(self._valid[classes], image_keys, -1.0)
        slots = image_keys.topk(per_class, dim=2).indices
        indices = torch.gather(self._table[classes], 2, slots)
        if self.rotate:
            rotations = torch.randint(
                0, 4, (num_tasks, self.num_ways), generator=generator, device=draw_on
            ).to(self.device)
        else:
            rotations = torch.zeros(num_tasks, self.num_ways, dtype=torch.int64, device=self.device)
        return EpisodeSpec(classes, indices, rotations)

    def gather(self, spec: EpisodeSpec) -> Task:
        """Build the tasks a spec describes: float images in ``[0, 1]`` and labels.

        Deterministic and pure. Labels follow the spec's class order: ``spec.classes[t, j]``
        gets label ``j``. Support and query are ordered class by class. The spec's rotations
        are applied when the sampler was built with ``rotate=True``.

        Args:
            spec: from :meth:`describe` (or a slice of one), on :attr:`device`.

        Returns:
            ``Task(support=(x, y), query=(x, y))`` with support ``x: [T, num_ways * num_shots,
            C, H, W]``, ``y: [T, num_ways * num_shots]`` int64 in ``0..num_ways-1``, and query
            ``x: [T, num_ways * num_query, C, H, W]``, ``y: [T, num_ways * num_query]``.

        Raises:
            ValueError: a spec whose shape doesn't match this sampler's ways, shots and query.
        """
        per_class = self.num_shots + self.num_query
        if spec.indices.dim() != 3 or tuple(spec.indices.shape[1:]) != (self.num_ways, per_class):
            raise ValueError(
                "EpisodeSampler.gather(): the spec's indices have shape "
                f"{tuple(spec.indices.shape)}, expected [T, {self.num_ways}, {per_class}] "
                f"(num_ways, num_shots + num_query). Gather a spec with the sampler that drew it."
            )
        num_tasks = spec.indices.shape[0]
        channels, height, width = self.data.image_shape
        x = self.data.images[spec.indices]  # [T, ways, shots+query, C, H, W] uint8
        if self.rotate:
            flat = x.reshape(num_tasks, self.num_ways, per_class, channels, height * width)
            index = self._rotation_index[spec.rotations]  # [T, ways, H*W]
            index = index[:, :, None, None, :].expand_as(flat)
            x = torch.gather(flat, 4, index).view_as(x)
        if x.device.type == "cpu":
            x = x.to(self.dtype) / 255.0  # correctly rounded on the CPU: equals the table
        else:
            x = self._to_unit[x.int()]
        labels = torch.arange(self.num_ways, device=self.device)
        support_x = x[:, :, : self.num_shots].reshape(num_tasks, -1, channels, height, width)
        query_x = x[:, :, self.num_shots :].reshape(num_tasks, -1, channels, height, width)
        support_y = labels.repeat_interleave(self.num_shots).repeat(num_tasks, 1)
        query_y = labels.repeat_interleave(self.num_query).repeat(num_tasks, 1)
        return Task(support=(support_x, support_y), query=(query_x, query_y))

    def sample(self, num_tasks: int, generator: torch.Generator) -> Task:
        """``gather(describe(num_tasks, generator))``: a meta-batch of ``num_tasks`` tasks."""
        return self.gather(self.describe(num_tasks, generator))

    def __repr__(self) -> str:
        within = ", within_groups=True" if self.within_groups else ""
        return (
            f"EpisodeSampler({self.num_ways}-way, {self.num_shots}-shot, "
            f"num_query={self.num_query}, rotate={self.rotate}{within}, data={self.data!r})"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    index_a = 0 if a.index is None else a.index
    index_b = 0 if b.index is None else b.index
    return index_a == index_b


def fixed_episodes(sampler: EpisodeSampler, num_episodes: int, seed: int) -> EpisodeSpec:
    """A fixed set of evaluation tasks: the same ``seed`` gives the same tasks, always.

    Drawn from a fresh CPU generator seeded with ``seed``, so the result depends on nothing
    else: not on the global RNG, not on other generators, not on the device (the spec is moved
    to the sampler's device). MAML evaluates on 600 tasks drawn once this way.

    Args:
        sampler: the sampler whose data and sizes define the tasks.
        num_episodes: the number of tasks.
        seed: any int.

    Returns:
        An :class:`EpisodeSpec` of ``num_episodes`` tasks; gather slices of it as meta-batches.

    Example:
        >>> import torch
        >>> data = ClassImages(torch.zeros(12, 1, 4, 4, dtype=torch.uint8),
        ...                    torch.arange(12) % 4, tuple("abcd"))
        >>> sampler = EpisodeSampler(data, num_ways=2, num_shots=1, num_query=1)
        >>> a, b = fixed_episodes(sampler, 600, seed=1), fixed_episodes(sampler, 600, seed=1)
        >>> bool((a.indices == b.indices).all())
        True
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return sampler.describe(num_episodes, generator)


_MOVED = {"load_splits": "fmaml.tasks.datasets", "DATASETS": "fmaml.tasks.datasets"}


def __getattr__(name: str):
    if name in _MOVED:  # moved so that no loader and this module import each other
        raise ImportError(
            f"fmaml.tasks.images.{name} moved to {_MOVED[name]}.{name} (also fmaml.tasks.{name} "
            f"for load_splits): import it from there."
        )
    raise AttributeError(f"module 'fmaml.tasks.images' has no attribute {name!r}")
