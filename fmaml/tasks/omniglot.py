"""Omniglot (Lake et al., Science 2015): 1,623 handwritten characters from 50 alphabets.

The loader reads the official folder layout ``<alphabet>/<character>/<image>.png`` from a root
that is either

* a folder of alphabets (e.g. the shared ``images_background_small`` subset, or MAML's
  ``omniglot_resized`` with all 50 alphabets in one folder), or
* a folder holding the unzipped official archives ``images_background/`` (30 alphabets,
  964 characters) and/or ``images_evaluation/`` (20 alphabets, 659 characters).

Images are resized once to ``image_size`` (default 28) with LANCZOS and inverted so strokes are
255 (1.0 once scaled), as in MAML, and stored as uint8 ``[N, 1, H, W]``. Each class remembers
its alphabet (``ClassImages.groups``).
"""

from __future__ import annotations

import os
import urllib.error
import zipfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch

from fmaml.errors import ConfigError
from fmaml.tasks.cache import cached_images
from fmaml.tasks.images import (
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    ClassImages,
    DataError,
    decode_images,
    parse_fractions,
    split_classes,
    split_counts,
    split_groups,
)

__all__ = [
    "BACKGROUND_ALPHABETS",
    "DEFAULT_PARTIAL_SPLIT",
    "EVALUATION_ALPHABETS",
    "MAML_SPLIT_SIZES",
    "NUM_CHARACTERS",
    "OMNIGLOT_ARCHIVES",
    "OMNIGLOT_URL",
    "download_omniglot",
    "load_omniglot",
    "split_omniglot",
]

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
"""Where the official archives live; ``<OMNIGLOT_URL>/<name>.zip``."""

OMNIGLOT_ARCHIVES = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
"""The official archives and their md5 checksums."""

NUM_CHARACTERS = 1623
MAML_SPLIT_SIZES = (1100, 100, 423)
"""Characters in MAML's train / val / test split."""

DEFAULT_PARTIAL_SPLIT = "alphabet:0.75,0,0.25"
"""The default split when the root holds only part of Omniglot."""

BACKGROUND_ALPHABETS = frozenset(
    {
        "Alphabet_of_the_Magi",
        "Anglo-Saxon_Futhorc",
        "Arcadian",
        "Armenian",
        "Asomtavruli_(Georgian)",
        "Balinese",
        "Bengali",
        "Blackfoot_(Canadian_Aboriginal_Syllabics)",
        "Braille",
        "Burmese_(Myanmar)",
        "Cyrillic",
        "Early_Aramaic",
        "Futurama",
        "Grantha",
        "Greek",
        "Gujarati",
        "Hebrew",
        "Inuktitut_(Canadian_Aboriginal_Syllabics)",
        "Japanese_(hiragana)",
        "Japanese_(katakana)",
        "Korean",
        "Latin",
        "Malay_(Jawi_-_Arabic)",
        "Mkhedruli_(Georgian)",
        "N_Ko",
        "Ojibwe_(Canadian_Aboriginal_Syllabics)",
        "Sanskrit",
        "Syriac_(Estrangelo)",
        "Tagalog",
        "Tifinagh",
    }
)
"""The 30 alphabets of ``images_background``."""

EVALUATION_ALPHABETS = frozenset(
    {
        "Angelic",
        "Atemayar_Qelisayer",
        "Atlantean",
        "Aurek-Besh",
        "Avesta",
        "Ge_ez",
        "Glagolitic",
        "Gurmukhi",
        "Kannada",
        "Keble",
        "Malayalam",
        "Manipuri",
        "Mongolian",
        "Old_Church_Slavonic_(Cyrillic)",
        "Oriya",
        "Sylheti",
        "Syriac_(Serto)",
        "Tengwar",
        "Tibetan",
        "ULOG",
    }
)
"""The 20 alphabets of ``images_evaluation``."""


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _has_archives(root: Path) -> bool:
    return any((root / name).is_dir() for name in OMNIGLOT_ARCHIVES)


def download_omniglot(
    root: str | os.PathLike[str],
    *,
    base_url: str = OMNIGLOT_URL,
    archives: dict[str, str] | None = None,
) -> None:
    """Download and unzip the official Omniglot archives that ``root`` doesn't hold yet.

    Each archive ``<name>.zip`` is fetched from ``<base_url>/<name>.zip`` with
    ``torchvision.datasets.utils.download_and_extract_archive`` (a progress bar is shown),
    checked against its md5, unzipped into ``root`` (giving ``root/<name>/``) and deleted.
    ``base_url`` may also be a ``file://`` URL of a local mirror. Archives whose folder is
    already there are skipped.

    Args:
        root: the folder to download into; created if missing (and removed again, with any
            parent it made, if the download fails).
        base_url: where the archives are; default :data:`OMNIGLOT_URL`.
        archives: ``{name: md5}``; default :data:`OMNIGLOT_ARCHIVES` (both archives).

    Raises:
        DataError: the download failed, the checksum didn't match, or the archive didn't hold
            the expected folder; the folders it made for the download are removed again.
    """
    root = Path(root).expanduser()
    archives = OMNIGLOT_ARCHIVES if archives is None else archives
    where = "download_omniglot()"
    made = [folder for folder in (root, *root.parents) if not folder.exists()]
    try:
        _download_archives(root, archives, base_url, where)
    except DataError:
        for folder in made:  # deepest first: a failed download leaves no folder it made
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _download_archives(root: Path, archives: dict[str, str], base_url: str, where: str) -> None:
    """The loop of :func:`download_omniglot` over ``archives``."""
    from torchvision.datasets.utils import (
        check_integrity,
        download_and_extract_archive,
        extract_archive,
    )

    for name, md5 in archives.items():
        if (root / name).is_dir():
            continue
        url = f"{base_url.rstrip('/')}/{name}.zip"
        archive = root / f"{name}.zip"
        try:
            root.mkdir(parents=True, exist_ok=True)
            parsed = urlparse(url)
            if parsed.scheme == "file":
                source = Path(url2pathname(parsed.path))
                archive.write_bytes(source.read_bytes())
                if not check_integrity(os.fspath(archive), md5):
                    raise RuntimeError("File not found or corrupted.")
                extract_archive(os.fspath(archive), os.fspath(root), remove_finished=True)
            else:
                download_and_extract_archive(
                    url, os.fspath(root), filename=archive.name, md5=md5, remove_finished=True
                )
        except RuntimeError as error:  # torchvision's word for a failed md5 check
            archive.unlink(missing_ok=True)
            raise DataError(
                f"{where}: {url} did not match its md5 checksum {md5} ({error}); the corrupt "
                f"download was deleted. Try again, or download {name}.zip by hand and unzip it "
                f"into {os.fspath(root)!r}."
            ) from error
        except (urllib.error.URLError, OSError, zipfile.BadZipFile) as error:
            archive.unlink(missing_ok=True)
            raise DataError(
                f"{where}: could not download {url} ({error}). Check the network connection, "
                f"or download {name}.zip by hand and unzip it into {os.fspath(root)!r}."
            ) from error
        if not (root / name).is_dir():
            raise DataError(
                f"{where}: {name}.zip from {url} did not contain a folder {name}/. Check "
                "base_url points at the official Omniglot archives."
            )


def _find_characters(root: Path) -> list[tuple[str, str, list[Path]]]:
    """``(alphabet, character, image files)`` for every character folder, sorted by name."""
    where = "load_omniglot()"
    if _has_archives(root):
        alphabets = [
            a for name in OMNIGLOT_ARCHIVES if (root / name).is_dir() for a in _subdirs(root / name)
        ]
    else:
        alphabets = _subdirs(root)
    if not alphabets:
        raise DataError(
            f"{where}: no Omniglot alphabets under {os.fspath(root)!r}. Expected "
            "<root>/<alphabet>/<character>/<image>.png, or <root>/images_background/ and/or "
            "<root>/images_evaluation/. Pass download=True (CLI: --download) to fetch the "
            "official archives into it."
        )
    found: dict[tuple[str, str], list[Path]] = {}
    for alphabet in alphabets:
        characters = _subdirs(alphabet)
        if not characters:
            raise DataError(
                f"{where}: the alphabet folder {os.fspath(alphabet)!r} holds no character "
                "folders. Expected <root>/<alphabet>/<character>/<image>.png: point the root "
                "at the folder that holds the alphabets."
            )
        for character in characters:
            files = _image_files(character)
            if not files:
                hint = (
                    " It holds folders: is the root one level too high?"
                    if _subdirs(character)
                    else ""
                )
                raise DataError(
                    f"{where}: the character folder {os.fspath(character)!r} holds no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}).{hint} Add its images or delete it."
                )
            key = (alphabet.name, character.name)
            if key in found:
                raise DataError(
                    f"{where}: the character {alphabet.name}/{character.name} appears twice "
                    f"under {os.fspath(root)!r}. Keep one copy."
                )
            found[key] = files
    return [
        (alphabet, character, found[alphabet, character]) for alphabet, character in sorted(found)
    ]


def load_omniglot(
    root: str | os.PathLike[str],
    *,
    image_size: int = 28,
    download: bool = False,
    base_url: str = OMNIGLOT_URL,
    cache: bool = True,
) -> ClassImages:
    """Load Omniglot from ``root``: every character a class, resized, inverted, as uint8.

    Classes are sorted by ``"<alphabet>/<character>"`` whichever layout the root uses, so the
    same characters give the same labels. Decoded images are cached
    (:func:`fmaml.tasks.cache.cached_images`); the next load reads the cache.

    Args:
        root: a folder of alphabets, or a folder holding ``images_background/`` and/or
            ``images_evaluation/``.
        image_size: side of the resized images (MAML: 28).
        download: if ``root`` holds no alphabets, fetch the archives that are missing
            (:func:`download_omniglot`).
        base_url: passed to :func:`download_omniglot`.
        cache: read and write the decode-once cache.

    Returns:
        :class:`ClassImages` with images ``[N, 1, image_size, image_size]`` uint8 (strokes
        255), class names ``"<alphabet>/<character>"`` and groups = alphabets.

    Raises:
        DataError: no data at ``root`` (and no download), an empty character folder, an
            unreadable image (named), or a failed download.

    Example:
        >>> data = load_omniglot("../shared/data/omniglot/images_background_small")
        ... # doctest: +SKIP
        >>> data.num_classes, data.image_shape  # doctest: +SKIP
        (242, (1, 28, 28))
    """
    root = Path(root).expanduser()
    if download:
        if not root.is_dir() or _has_archives(root) or not _subdirs(root):
            download_omniglot(root, base_url=base_url)
    elif not root.is_dir():
        raise DataError(
            f"load_omniglot(): the data folder {os.fspath(root)!r} does not exist. Pass "
            "download=True (CLI: --download) to fetch Omniglot into it, or point it at a folder "
            "of alphabets or one holding images_background/ and images_evaluation/."
        )
    characters = _find_characters(root)
    files = [file for _, _, images in characters for file in images]
    counts = [len(images) for _, _, images in characters]
    labels = torch.repeat_interleave(torch.arange(len(characters)), torch.tensor(counts))

    def build() -> np.ndarray:
        return 255 - decode_images(files, image_size, "L")

    settings = f"{image_size}x{image_size}-L-inverted"
    images = cached_images("omniglot", root, files, settings, build, enabled=cache)
    return ClassImages(
        torch.from_numpy(images),
        labels,
        tuple(f"{alphabet}/{character}" for alphabet, character, _ in characters),
        tuple(alphabet for alphabet, _, _ in characters),
    )


def _archive_split(
    data: ClassImages, val_fraction: float, generator: torch.Generator, where: str
) -> dict[str, ClassImages]:
    assert data.groups is not None
    alphabets = sorted({str(g) for g in data.groups})
    unknown = [a for a in alphabets if a not in BACKGROUND_ALPHABETS | EVALUATION_ALPHABETS]
    if unknown:
        raise DataError(
            f"{where}: split 'alphabet' follows the official archives, but these alphabets are "
            f"in neither: {unknown[:5]}. Use a proportional split such as "
            f"'{DEFAULT_PARTIAL_SPLIT}'."
        )
    background = [a for a in alphabets if a in BACKGROUND_ALPHABETS]
    evaluation = [a for a in alphabets if a in EVALUATION_ALPHABETS]
    if not background or not evaluation:
        missing = "images_evaluation" if not evaluation else "images_background"
        raise DataError(
            f"{where}: split 'alphabet' trains on the images_background alphabets and tests on "
            f"the images_evaluation ones, but the data holds {len(background)} background and "
            f"{len(evaluation)} evaluation alphabets. Add {missing} (download=True fetches "
            f"it) or use a proportional split such as '{DEFAULT_PARTIAL_SPLIT}'."
        )
    _, num_val = split_counts(len(background), (1 - val_fraction, val_fraction))
    if num_val == len(background):
        raise DataError(
            f"{where}: a validation proportion of {val_fraction:g} leaves no background "
            "alphabet for training. Use a smaller one, e.g. 'alphabet:0.15'."
        )
    order = torch.randperm(len(background), generator=generator).tolist()
    val = {background[i] for i in order[:num_val]}
    parts = {
        "train": {a for a in background if a not in val},
        "val": val,
        "test": set(evaluation),
    }
    return {
        name: data.subset([c for c, g in enumerate(data.groups) if g in parts[name]])
        for name in SPLIT_NAMES
        if parts[name]
    }


def split_omniglot(
    data: ClassImages, split: str | None = None, *, seed: int = 0
) -> dict[str, ClassImages]:
    """Split Omniglot characters into train / val / test.

    Deterministic given ``seed`` (a ``torch.Generator`` seeded with it drives every shuffle).
    Alphabet splits are disjoint in alphabets, the others in characters.

    Split strings:

    * ``"maml"``: MAML's split: the 1,623 characters pooled, shuffled, cut 1100 / 100 / 423.
      Same procedure and sizes as the MAML code; the characters differ, since MAML's shuffle
      depends on ``os.listdir`` order and Python's ``random``. Needs the full dataset.
    * ``"alphabet"``: the official archives: background alphabets train, evaluation test.
      ``"alphabet:V"``: also a proportion ``V`` of the background alphabets as val.
    * ``"alphabet:T,V,E"``: alphabets shuffled and cut by the proportions (rounded to whole
      alphabets; on the 8-alphabet subset ``"alphabet:0.75,0,0.25"`` gives 6 / 0 / 2).
    * ``"character:T,V,E"``: characters shuffled and cut by the proportions.
    * ``None``: ``"maml"`` for the full dataset, else :data:`DEFAULT_PARTIAL_SPLIT`.

    Args:
        data: from :func:`load_omniglot`.
        split: a split string as above.
        seed: seeds the shuffle.

    Returns:
        ``{"train", "val", "test"}`` -> :class:`ClassImages`; ``"val"`` is absent when the
        split has no validation characters.

    Raises:
        ValueError: an unknown or malformed split string.
        DataError: ``"maml"`` without the full dataset, ``"alphabet"`` without both archives'
            alphabets, or proportions that leave train or test empty.

    Example:
        >>> splits = split_omniglot(data, "alphabet:0.75,0,0.25", seed=0)  # doctest: +SKIP
    """
    where = "split_omniglot()"
    if split is None:
        split = "maml" if data.num_classes == NUM_CHARACTERS else DEFAULT_PARTIAL_SPLIT
    kind, _, argument = split.partition(":")
    generator = torch.Generator().manual_seed(seed)
    if kind == "maml" and not argument:
        if data.num_classes != NUM_CHARACTERS:
            raise DataError(
                f"{where}: split 'maml' takes MAML's 1100 / 100 / 423 characters of all "
                f"{NUM_CHARACTERS}, but the data holds {data.num_classes} (a partial Omniglot). "
                f"Use a proportional split such as '{DEFAULT_PARTIAL_SPLIT}' or "
                "'character:0.7,0.1,0.2', or load the full dataset (download=True)."
            )
        order = torch.randperm(NUM_CHARACTERS, generator=generator).tolist()
        num_train, num_val, _ = MAML_SPLIT_SIZES
        cuts = {
            "train": order[:num_train],
            "val": order[num_train : num_train + num_val],
            "test": order[num_train + num_val :],
        }
        return {name: data.subset(sorted(ids)) for name, ids in cuts.items()}
    if kind == "alphabet" and "," not in argument:
        try:
            val_fraction = float(argument) if argument else 0.0
        except ValueError:
            val_fraction = -1.0
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(
                f"{where}: 'alphabet:V' takes a validation proportion 0 <= V < 1, got "
                f"{split!r}. Write e.g. 'alphabet:0.15', or 'alphabet:T,V,E' for proportions "
                "of all alphabets."
            )
        return _archive_split(data, val_fraction, generator, where)
    if kind in ("alphabet", "character") and argument:
        fractions = parse_fractions(argument, where=f"{where} ({split!r})")
        if kind == "alphabet":
            return split_groups(data, fractions, generator)
        return split_classes(data, fractions, generator)
    raise ConfigError(
        f"{where}: unknown split {split!r}. Use 'maml', 'alphabet', 'alphabet:V', "
        "'alphabet:T,V,E' or 'character:T,V,E' (e.g. 'alphabet:0.75,0,0.25')."
    )
