"""Checkpoints: written atomically, read back with ``weights_only=True``."""

from __future__ import annotations

import codecs
import os
import pickle
import pickletools
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from fmaml.errors import InputError, WriteError

FORMAT = "fmaml-checkpoint"
VERSION = 1
LATEST = "latest.pt"
_PICKLE_PROTOCOL = 2  # what torch.save writes (DEFAULT_PROTOCOL)
BEST = "best.pt"


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable or not fmaml's."""


def save_checkpoint(path: str | Path, contents: dict[str, Any]) -> None:
    """Write ``contents`` to ``path`` atomically: a crash mid-write leaves the old file intact.

    The data goes to a temporary file in the same folder, is flushed to disk, and then
    replaces ``path`` in one ``os.replace``.

    Raises:
        WriteError: (an ``OSError``) the file could not be written, e.g. a full disk; the
            message names the file and says that the previous one is intact.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **contents}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        kept = (
            f"the previous {path.name} is intact"
            if path.exists()
            else f"no earlier {path.name} existed"
        )
        raise WriteError(
            f"could not write the checkpoint {path} ({error.strerror or error}); {kept}. "
            "Free space on that disk (or make the folder writable), then continue with "
            "`fmaml train --resume` on the run folder."
        ) from error
    finally:
        if tmp is not None and os.path.exists(tmp):
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


_FIX = (
    "Pass a checkpoint written by `fmaml train` (latest.pt or best.pt in its run folder); if "
    "this file was one, it is damaged: use the run's other checkpoint, or train again."
)

# What a checkpoint must hold, and the type of each entry.
_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "iteration": int,
    "params": dict,
    "optimizer": dict,
    "generator": torch.Tensor,
    "best": dict,
}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors land on the CPU).

    The file is read with ``torch.load(..., weights_only=True)``: tensors and plain
    containers only, so a crafted file can't run code. Whatever the file holds (nothing, text,
    a damaged archive, another program's state dict, a newer format), the result is the
    checkpoint or a :class:`CheckpointError` that names the file and says what was found.

    Raises:
        CheckpointError: the file is missing, cannot be read as a torch file, or is not
            an fmaml checkpoint of a version this fmaml reads.
    """
    path = find_checkpoint(path)
    if not _is_zip(path):  # torch.save writes a zip archive; nothing else is read
        raise CheckpointError(f"{path} is not an fmaml checkpoint: found {_describe(path)}. {_FIX}")
    if not _holds_torch_pickle(path):
        raise CheckpointError(
            f"{path} is not an fmaml checkpoint: found a zip archive without the data record "
            f"that torch.save writes (or with a damaged one). {_FIX}"
        )
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = (
            "a torch file that holds Python objects besides tensors and plain containers "
            "(refused: loading them could run code)"
            if "unsupported global" in str(error).lower()
            else f"a damaged torch file ({path.stat().st_size} bytes)"
        )
        raise CheckpointError(f"{path} is not an fmaml checkpoint: found {found}. {_FIX}") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, OSError):
        # torch.load's ways of failing on a zip archive that is not a sound torch file
        raise CheckpointError(
            f"{path} is not an fmaml checkpoint: found {_describe(path)}. {_FIX}"
        ) from None
    if not isinstance(contents, dict) or contents.get("format") != FORMAT:
        if isinstance(contents, dict):
            keys = sorted(map(str, contents))
            shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
            found = f"a torch file holding a dict with keys [{shown}] (another program's?)"
        else:
            found = f"a torch file holding a {type(contents).__name__}"
        raise CheckpointError(f"{path} is not an fmaml checkpoint: found {found}. {_FIX}")
    version = contents.get("version")
    if version != VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > VERSION
        raise CheckpointError(
            f"{path} is an fmaml checkpoint of format version {version!r}, "
            + (
                f"written by a newer fmaml; this fmaml reads version {VERSION}. Upgrade fmaml "
                "to read it."
                if newer
                else f"which this fmaml (format version {VERSION}) does not read. Use the fmaml "
                "release that wrote it."
            )
        )
    for key, kind in _SCHEMA.items():
        if not isinstance(contents.get(key), kind) or isinstance(contents.get(key), bool):
            found = "nothing" if key not in contents else type(contents[key]).__name__
            raise CheckpointError(
                f"{path} is a damaged fmaml checkpoint: its {key!r} should be a "
                f"{getattr(kind, '__name__', kind)}, found {found}. {_FIX}"
            )
    bad = [name for name, value in contents["params"].items() if not torch.is_tensor(value)]
    if bad:
        raise CheckpointError(
            f"{path} is a damaged fmaml checkpoint: params {bad[:3]} are not tensors. {_FIX}"
        )
    return contents


def _describe(path: Path) -> str:
    """What a file that torch can't read looks like, in words, for an error message."""
    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            head = stream.read(256)
    except OSError as error:
        return f"a file that can't be read ({error.strerror or error})"
    if size == 0:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK"):
        if _is_zip(path):
            return f"a zip archive of {size} bytes that is not a torch file, or a damaged one"
        return f"a truncated or damaged zip archive ({size} bytes)"
    if head[:1] == b"\x80":
        return f"a pickle or legacy torch file ({size} bytes) that is damaged or not a checkpoint"
    try:  # a multi-byte character cut at the end of `head` is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch.isprintable() or ch in "\n\r\t" for ch in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"a text file of {size} bytes starting {first!r}"
    return f"{size} bytes of binary data that is neither a zip archive nor text"


def _is_zip(path: Path) -> bool:
    """Whether ``path`` ends with a zip archive's directory (damaged ones may not)."""
    try:
        return zipfile.is_zipfile(path)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


def _holds_torch_pickle(path: Path) -> bool:
    """Whether the archive is laid out as ``torch.save`` writes it, checked without loading.

    One ``*/data.pkl`` record whose opcodes parse and stay in the pickle protocol
    ``torch.save`` writes, and no TorchScript code (which ``torch.load`` would hand to
    ``torch.jit.load``). Checked before ``torch.load``, so that a damaged file is reported as
    such rather than met by torch's warnings about unknown protocols.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            records = [name for name in names if name.endswith("/data.pkl")]
            if len(records) != 1 or any(name.endswith("/constants.pkl") for name in names):
                return False
            data = archive.read(records[0])
        return all(
            arg == _PICKLE_PROTOCOL for op, arg, _ in pickletools.genops(data) if op.name == "PROTO"
        )
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, RuntimeError, struct.error):
        return False
