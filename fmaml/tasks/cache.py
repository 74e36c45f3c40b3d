"""Decode once: keep resized uint8 image arrays in a cache file, keyed by their source.

Decoding and resizing thousands of image files takes seconds to minutes; the result is a
single uint8 array. :func:`cached_images` stores it in an ``.npz`` file and loads that file on
the next run, as long as the source is unchanged.

The user's data folders are read-only to fmaml: nothing is ever written next to the data.
The file goes to the user cache folder, :func:`cache_dir`: ``$FMAML_CACHE`` if set, else
``$XDG_CACHE_HOME/fmaml``, else ``~/.cache/fmaml``, as
``<name>-<settings>-<hash of root's absolute path>-<key>.npz``.

The key is a hash of the relative path, size and modification time of every source file, in
order, plus ``name`` and ``settings``: change, add, remove or reorder a file and the key
changes, so a stale cache is never read; it is rebuilt, and the stale file for the same
source and settings is deleted. Files are written atomically (a uniquely named temporary file
in the same folder, then ``os.replace``), so an interrupted run never leaves a half-written
cache, and two processes that build the same cache at once (jobs of a cluster sharing a home
folder) both end with a valid file: whichever replaces last, the file is whole. A cache file
that can't be read is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fmaml.tasks.images import DataError

__all__ = ["CACHE_ENV", "cache_dir", "cached_images", "source_key"]

CACHE_ENV = "FMAML_CACHE"
"""Environment variable naming the user cache folder (see :func:`cache_dir`)."""

_FORMAT = 1  # bump when the layout of cached arrays changes


def cache_dir() -> Path:
    """The user cache folder: ``$FMAML_CACHE``, else ``$XDG_CACHE_HOME/fmaml``, else
    ``~/.cache/fmaml`` (empty variables count as unset)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec ignores relative paths
        return Path(xdg) / "fmaml"
    return Path.home() / ".cache" / "fmaml"


def source_key(
    root: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]], settings: str
) -> str:
    """A hex key for the files' relative paths, sizes and mtimes (in order) and ``settings``.

    Raises:
        DataError: a source file can't be found (the message names it).
    """
    root = Path(root)
    digest = hashlib.sha256()
    digest.update(json.dumps([_FORMAT, settings]).encode())
    for file in files:
        path = Path(file)
        try:
            info = path.stat()
        except OSError as error:
            raise DataError(
                f"source_key(): can't read {os.fspath(path)!r} ({error}). "
                "Check that the file exists and is readable."
            ) from error
        try:
            name = path.relative_to(root).as_posix()
        except ValueError:
            name = path.as_posix()
        digest.update(json.dumps([name, info.st_size, info.st_mtime_ns]).encode())
    return digest.hexdigest()


def _read(path: Path, key: str, num_images: int) -> np.ndarray | None:
    """The cached array at ``path`` if it is there, readable and made for ``key``; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            images = stored["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != num_images:
        return None
    return images


def _write(path: Path, key: str, images: np.ndarray) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".fmaml-tmp-{os.getpid()}-{secrets.token_hex(6)}.npz"
    # os.open with 0o666 honours the umask (mkstemp would make the file private to its owner).
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, key=np.array(key), images=images)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _remove_stale(folder: Path, prefix: str, keep: Path) -> None:
    for old in folder.glob(f"{prefix}*.npz"):
        if old != keep:
            old.unlink(missing_ok=True)


def cached_images(
    name: str,
    root: str | os.PathLike[str],
    files: Sequence[str | os.PathLike[str]],
    settings: str,
    build: Callable[[], np.ndarray],
    *,
    enabled: bool = True,
    num_images: int | None = None,
) -> np.ndarray:
    """The images ``build()`` returns for ``files``, from the cache when it is up to date.

    On a hit nothing is decoded. On a miss ``build()`` runs and its result is written to the
    user cache folder (:func:`cache_dir`); nothing is written into ``root``.

    Args:
        name: the dataset, e.g. ``"omniglot"``; letters, digits, ``-`` and ``_`` only.
        root: the data folder; relative file paths in the key are taken from it.
        files: the source files, in the order of the rows ``build()`` returns.
        settings: what else determines the result, e.g. ``"28x28-L-inverted"``.
        build: decodes ``files``, returning ``[num_images, C, H, W]`` uint8.
        enabled: False skips the cache entirely: just ``build()``.
        num_images: how many images ``build()`` returns, when ``files`` is not one file per
            image (a pickle or an archive holding them all); default ``len(files)``.

    Returns:
        ``[num_images, C, H, W]`` uint8 array.

    Raises:
        DataError: a source file is missing, or the cache folder can't be written.
    """
    if not enabled:
        return build()
    root = Path(root)
    key = source_key(root, files, settings)
    place = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:12]
    prefix = f"{name}-{settings}-{place}-"
    path = cache_dir() / f"{prefix}{key[:16]}.npz"
    images = _read(path, key, len(files) if num_images is None else num_images)
    if images is not None:
        return images
    images = build()
    try:
        _write(path, key, images)
    except OSError as error:
        raise DataError(
            f"cached_images(): could not write the image cache for {name!r} in "
            f"{os.fspath(path.parent)!r} ({error.strerror or error}). Set {CACHE_ENV} to a "
            "writable folder, or pass cache=False."
        ) from error
    _remove_stale(path.parent, prefix, keep=path)
    return images
