"""Helpers for the image-data tests: tiny generated images in the real layouts.

Not a conftest: import what you need, ``from conftest_images import ...``.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmaml.tasks.images import ClassImages

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OMNIGLOT_SUBSET = Path(
    os.environ.get("FMAML_TEST_OMNIGLOT") or SHARED_DATA / "omniglot" / "images_background_small"
)
"""The real Omniglot subset; ``$FMAML_TEST_OMNIGLOT`` points the tests at a copy of it."""


@pytest.fixture
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point ``$FMAML_CACHE`` at a fresh temporary folder; yields that folder."""
    folder = tmp_path_factory.mktemp("fmaml-cache")
    monkeypatch.setenv("FMAML_CACHE", str(folder))
    return folder


def folder_train_args(images: Path, split: str) -> list:
    """``train`` arguments for a tiny, fast run on a class folder made by :func:`make_folder`
    (2-way 1-shot, 8x8 images, 4 filters, meta-batch 2)."""
    return [
        "train", "--dataset", "folder", "--data-root", images, "--split", split,
        "--ways", "2", "--shots", "1", "--query", "1", "--meta-batch", "2",
        "--image-size", "8", "--hidden", "4",
    ]  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder below ``folder`` (hidden ones too): its kind, mode, size, mtime
    and content hash, to assert that something left a folder byte-for-byte unchanged."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        found[path.relative_to(folder).as_posix()] = (
            info.st_mode,
            info.st_size if path.is_file() else None,
            info.st_mtime_ns,
            digest,
        )
    return found


def glyph(seed: int, size: int = 16) -> np.ndarray:
    """A random black-on-white 1-bit drawing: ``[size, size]`` bool, True = white paper."""
    rng = np.random.default_rng(seed)
    paper = np.ones((size, size), dtype=bool)
    paper[rng.random((size, size)) < 0.25] = False
    return paper


def make_omniglot(
    root: Path,
    alphabets: Mapping[str, int],
    *,
    images_per_character: int = 3,
    size: int = 16,
) -> list[Path]:
    """Write ``<root>/<alphabet>/characterNN/<id>_<drawer>.png`` as 1-bit PNGs.

    Returns the files written, in sorted order.
    """
    files = []
    seed = 0
    for alphabet, num_characters in alphabets.items():
        for c in range(1, num_characters + 1):
            folder = root / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for drawer in range(1, images_per_character + 1):
                path = folder / f"{seed:04d}_{drawer:02d}.png"
                Image.fromarray(glyph(seed * 100 + drawer, size)).save(path)
                files.append(path)
            seed += 1
    return sorted(files)


def make_zip(source: Path, name: str, destination: Path) -> tuple[Path, str]:
    """Zip ``source/<name>/`` as ``destination/<name>.zip``; returns the zip and its md5."""
    destination.mkdir(parents=True, exist_ok=True)
    archive = destination / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((source / name).rglob("*")):
            zipped.write(path, path.relative_to(source).as_posix())
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def make_folder(
    root: Path, sizes: Mapping[str, int], *, extension: str = ".png", shape=(20, 30)
) -> list[Path]:
    """Write ``<root>/<class>/imgNN<extension>``: RGB images, a solid colour per class."""
    files = []
    for k, (name, count) in enumerate(sizes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = ((60 * k) % 256, (255 - 40 * k) % 256, (100 + 70 * k) % 256)
        for i in range(count):
            path = folder / f"img{i:02d}{extension}"
            Image.new("RGB", (shape[1], shape[0]), colour).save(path)
            files.append(path)
    return files


def coded_images(sizes: list[int], *, side: int = 4, channels: int = 1) -> ClassImages:
    """In-memory classes of the given sizes; each image stores its own row number.

    Pixel ``[0, 0, 0]`` holds ``row // 256`` and pixel ``[0, 0, 1]`` ``row % 256``, so
    :func:`rows_of` recovers which image was gathered. Rows are interleaved across classes
    (not sorted by label) to exercise the sampler's index table.
    """
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    rows = torch.arange(len(labels))
    images = torch.zeros(len(labels), channels, side, side, dtype=torch.uint8)
    images[:, 0, 0, 0] = (rows // 256).to(torch.uint8)
    images[:, 0, 0, 1] = (rows % 256).to(torch.uint8)
    names = tuple(f"class{c}" for c in range(len(sizes)))
    return ClassImages(images, labels.to(torch.int64), names)


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """The row numbers :func:`coded_images` wrote, from gathered images ``[..., C, H, W]``."""
    codes = torch.round(x[..., 0, 0, :2] * 255).to(torch.int64)
    return codes[..., 0] * 256 + codes[..., 1]
