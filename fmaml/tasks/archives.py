"""The user's own dataset archives: checksums, downloads and unpacking, all in fmaml's cache.

A dataset archive (``cifar-100-python.tar.gz``, ``CUB_200_2011.tgz``) is read from the user's
data folder, or fetched, and checked against its published md5 (:func:`check_md5`). It is
unpacked into the user cache folder (:func:`fmaml.tasks.cache.cache_dir`), never beside the
archive: the data folder may be read-only or shared, and stays byte-for-byte unchanged.

* :func:`fetch` downloads ``url`` into ``<cache>/downloads/<name>`` (through a temporary file,
  checked before it takes its name), or reuses the file already there.
* :func:`unpack` extracts a tar archive into ``<cache>/unpacked/<stem>-<key>/`` once; the key
  is the archive's path, size and modification time, so a changed archive is unpacked again.
  Only regular files and folders are extracted, and only inside that folder: links, devices
  and names with ``..`` or a leading ``/`` are refused.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import secrets
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from fmaml.tasks.cache import cache_dir, source_key
from fmaml.tasks.images import DataError

__all__ = ["check_md5", "fetch", "md5_of", "unpack"]


def md5_of(path: str | os.PathLike[str]) -> str:
    """The md5 hex digest of a file, read in 1 MiB blocks.

    Raises:
        DataError: the file can't be read.
    """
    digest = hashlib.md5()
    try:
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise DataError(
            f"md5_of(): can't read {os.fspath(path)!r} ({error.strerror or error}). Check that "
            "the file exists and is readable."
        ) from error
    return digest.hexdigest()


def check_md5(path: str | os.PathLike[str], expected: str, *, where: str) -> None:
    """Raise unless ``path``'s md5 is ``expected``.

    Args:
        path: the file to check.
        expected: its published md5, lowercase hex.
        where: the function named at the start of the message.

    Raises:
        DataError: the digests differ; the message names the file and both digests, and how to
            accept a re-packed or modified copy (``verify=False``, CLI ``--no-checksum``).
    """
    found = md5_of(path)
    if found != expected:
        raise DataError(
            f"{where}: {os.fspath(path)!r} does not match its published checksum: expected md5 "
            f"{expected}, found {found}. The file is damaged or incomplete (download it again), "
            "or a modified copy: to use it anyway pass verify=False (CLI: --no-checksum)."
        )


def fetch(url: str, name: str, md5: str | None, *, where: str, hint: str) -> Path:
    """Download ``url`` into ``<cache>/downloads/<name>`` unless a good copy is there already.

    The bytes go to a temporary file in the same folder, are checked against ``md5`` (unless
    it is None) and only then renamed to ``name``: an interrupted or damaged download never
    takes the name. ``url`` may be a ``file://`` URL (a local mirror).

    Args:
        url: where the file is.
        name: its file name in the cache.
        md5: its published md5, or None to accept any content.
        where: the function named in messages.
        hint: what the user can do instead, e.g. "put cifar-100-python.tar.gz in '/data'".

    Returns:
        The downloaded file.

    Raises:
        DataError: the download failed, or its md5 is not ``md5`` (the bad copy is deleted).
    """
    folder = cache_dir() / "downloads"
    path = folder / name
    if path.is_file() and (md5 is None or md5_of(path) == md5):
        return path
    temporary = folder / f".fmaml-tmp-{os.getpid()}-{secrets.token_hex(6)}-{name}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        if md5 is not None:
            check_md5(temporary, md5, where=where)
        os.replace(temporary, path)
    except DataError as error:
        raise DataError(f"{error} (downloaded from {url}; the bad copy was deleted)") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise DataError(
            f"{where}: could not download {url} ({error}). Check the network connection, or {hint}."
        ) from error
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _safe_members(archive: tarfile.TarFile, path: Path, where: str) -> list[tarfile.TarInfo]:
    """The archive's regular files and folders, refusing anything that could leave the folder."""
    members = []
    for member in archive.getmembers():
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
            raise DataError(
                f"{where}: refused to unpack {os.fspath(path)!r}: it holds {member.name!r}, "
                "which is a link, a device or a path outside the archive's folder. Use the "
                "published archive."
            )
        members.append(member)
    return members


def unpack(archive: str | os.PathLike[str], *, where: str) -> Path:
    """Extract a tar archive (``.tar``, ``.tar.gz``, ``.tgz``) into fmaml's cache, once.

    Args:
        archive: the archive; it is only read.
        where: the function named in messages.

    Returns:
        The folder holding the archive's contents (``<cache>/unpacked/<stem>-<key>``).

    Raises:
        DataError: the archive is truncated or damaged, holds a link or a path outside its
            folder, or the cache can't be written.
    """
    archive = Path(archive).resolve()
    key = source_key("/", [archive], "unpacked")[:16]  # the full path, size and mtime
    stem = archive.name.split(".")[0]
    target = cache_dir() / "unpacked" / f"{stem}-{key}"
    if target.is_dir():
        return target
    temporary = target.parent / f".fmaml-tmp-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        temporary.mkdir(parents=True)
        with tarfile.open(archive, "r:*") as opened:
            for member in _safe_members(opened, archive, where):
                destination = temporary.joinpath(*PurePosixPath(member.name).parts)
                if member.isdir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                source = opened.extractfile(member)
                with source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
        os.replace(temporary, target)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(
            f"{where}: could not unpack {os.fspath(archive)!r} ({type(error).__name__}: "
            f"{error}). The archive is truncated or damaged: download it again."
        ) from None
    except OSError as error:
        if target.is_dir():  # another process unpacked it first
            return target
        raise DataError(
            f"{where}: could not unpack {os.fspath(archive)!r} into {os.fspath(target)!r} "
            f"({error}). The archive may be damaged, or the cache folder full or read-only: "
            "set FMAML_CACHE to a writable folder with room."
        ) from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target
