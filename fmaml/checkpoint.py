"""Checkpoints: written atomically, read back with ``weights_only=True``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "fmaml-checkpoint"
VERSION = 1
LATEST = "latest.pt"
BEST = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not fmaml's."""


def save_checkpoint(path: str | Path, contents: dict[str, Any]) -> None:
    """Write ``contents`` to ``path`` atomically: a crash mid-write leaves the old file intact.

    The data goes to a temporary file in the same folder, is flushed to disk, and then
    replaces ``path`` in one ``os.replace``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **contents}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a file; for a run folder, its ``best.pt`` (else ``latest.pt``).

    Raises:
        CheckpointError: nothing there, or a folder without checkpoints.
    """
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LATEST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"no checkpoint in the run folder {path}: expected {BEST} or {LATEST}. "
            "Pass a run folder written by `fmaml train`, or a checkpoint file."
        )
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Pass a checkpoint file or a run folder "
            "written by `fmaml train`."
        )
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors land on the CPU).

    Raises:
        CheckpointError: the file is missing, cannot be read as a torch file, or is not
            an fmaml checkpoint of a version this fmaml reads.
    """
    path = find_checkpoint(path)
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(error).__name__}: {str(error)[:200]}. "
            "Expected a file written by `fmaml train`; the run folder's latest.pt may be used "
            "instead."
        ) from error
    if not isinstance(contents, dict) or contents.get("format") != FORMAT:
        found = sorted(contents)[:8] if isinstance(contents, dict) else type(contents).__name__
        raise CheckpointError(
            f"{path} is not an fmaml checkpoint (found {found}). "
            "Pass a checkpoint written by `fmaml train`."
        )
    if contents.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is an fmaml checkpoint of version {contents.get('version')}; this fmaml "
            f"reads version {VERSION}. Use the fmaml release that wrote it."
        )
    return contents
