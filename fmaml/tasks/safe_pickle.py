"""Read pickles of containers and numpy arrays without running code from them.

A pickle is a program: it names Python functions and the loader calls them, so
``pickle.load`` on a crafted file can run anything (``os.system``, say). Published
mini-ImageNet files (``mini-imagenet-cache-*.pkl``) are pickles of a dict holding a uint8
array and lists of ints, so :func:`read_array_pickle` reads exactly that kind of content:

- lists, tuples, dicts, sets, strings, bytes, numbers, ``None`` and ``OrderedDict``;
- numpy arrays and scalars of plain numeric dtypes (bool, ints, floats), from pickles written
  by numpy 1.x or 2.x, Python 2 or 3, protocols 0 to 5.

It never calls numpy's own unpickling code either: the names a numpy pickle uses
(``_reconstruct``, ``dtype``, ``scalar``, ``_frombuffer``) are answered by stand-ins that only
record their arguments, and the arrays are then built here with ``np.frombuffer`` after their
dtype, shape and byte count are checked. Any other name is refused before anything it names
is called. The result is the file's content or a :class:`~fmaml.tasks.images.DataError`.
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import struct
from collections import OrderedDict
from typing import Any

import numpy as np

from fmaml.tasks.images import DataError

__all__ = ["read_array_pickle"]

_DTYPES = {"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"}
"""The dtypes an array in such a file may have (no objects, strings or records)."""


class _Refused(pickle.UnpicklingError):
    """The pickle asked for something other than containers and numpy arrays."""


class _Damaged(pickle.UnpicklingError):
    """The pickle's array records are not what numpy writes."""


class _NDArrayName:
    """Stands for the name ``numpy.ndarray`` in ``_reconstruct(ndarray, ...)``; not callable."""


_NDARRAY = _NDArrayName()


class _DType:
    """Stands for ``numpy.dtype(spec, align, copy)``; ``__setstate__`` gives its byte order."""

    def __init__(self, spec: object = None, align: object = False, copy: object = True):
        if not isinstance(spec, str) or spec not in _DTYPES:
            raise _Refused(
                f"an array of dtype {str(spec)[:20]!r} (read: {', '.join(sorted(_DTYPES))})"
            )
        self.spec, self.order = spec, "="

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _Damaged("a dtype's state")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        return np.dtype(self.spec).newbyteorder("=" if self.order == "|" else self.order)


class _Array:
    """Stands for ``_reconstruct(ndarray, ...)``; ``__setstate__`` records shape and bytes."""

    def __init__(self, cls: object = None, shape: object = None, typecode: object = None):
        if cls is not _NDARRAY:
            raise _Refused(f"an array of type {cls!r}")
        self.state: tuple | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Damaged("an array's state")
        _, shape, dtype, fortran, data = state
        if isinstance(data, str):  # written by Python 2, read with encoding="latin1"
            data = data.encode("latin1")
        self.state = (shape, dtype, bool(fortran), data)

    def numpy(self) -> np.ndarray:
        if self.state is None:
            raise _Damaged("an array without its data")
        shape, dtype, fortran, data = self.state
        return _array(data, dtype, shape, "F" if fortran else "C")


def _array(data: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """An array built from checked parts: a plain dtype, a shape of ints, the right bytes."""
    if not isinstance(dtype, _DType):
        raise _Damaged("an array without a plain numeric dtype")
    if (
        not isinstance(shape, tuple)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        or order not in ("C", "F")
    ):
        raise _Damaged(f"an array shape {str(shape)[:40]}")
    if not isinstance(data, bytes | bytearray):
        raise _Damaged("an array whose data are not bytes")
    numpy_dtype = dtype.numpy()
    if len(data) != math.prod(shape) * numpy_dtype.itemsize:
        raise _Damaged(
            f"an array of shape {list(shape)} with {len(data)} bytes of {numpy_dtype} data"
        )
    flat = np.frombuffer(bytes(data), dtype=numpy_dtype)
    return flat.reshape(shape, order=order).astype(numpy_dtype.newbyteorder("="), order="C")


def _scalar(dtype: object, data: object = b"") -> Any:
    """``numpy.core.multiarray.scalar(dtype, bytes)``: one number."""
    if isinstance(data, str):
        data = data.encode("latin1")
    return _array(data, dtype, (), "C")[()]


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """``numpy.core.numeric._frombuffer``: how protocol-5 pickles hold an array."""
    return _array(buffer, dtype, shape, order)


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """``_codecs.encode(text, "latin1")``: how protocol-2 pickles of Python 3 hold bytes."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"_codecs.encode(..., {str(encoding)[:20]!r})")
    return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], object]:
    names: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DType,
        ("_codecs", "encode"): _latin1_bytes,
        ("collections", "OrderedDict"): OrderedDict,
    }
    for builtin in (set, frozenset, bytearray):  # protocols 0-3 name these types
        names[("builtins", builtin.__name__)] = builtin
        names[("__builtin__", builtin.__name__)] = builtin  # written by Python 2
    for package in ("numpy.core", "numpy._core"):  # written by numpy 1.x and 2.x
        names[(f"{package}.multiarray", "_reconstruct")] = _Array
        names[(f"{package}.multiarray", "scalar")] = _scalar
        names[(f"{package}.numeric", "_frombuffer")] = _frombuffer
    return names


class _Unpickler(pickle.Unpickler):
    allowed = _allowed()

    def find_class(self, module: str, name: str) -> object:
        found = self.allowed.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid: object) -> object:
        raise _Refused(f"a persistent object {str(pid)[:40]!r}")


def _finish(value: object) -> object:
    """Replace every stand-in by the array it describes, through the containers.

    Each object is visited once: a pickle may share one list among many others (its memo),
    and a walk that followed every reference could take exponential time.
    """
    done: dict[int, object] = {}
    keep: list[object] = []  # keeps the originals alive, so that their ids stay unique

    def walk(item: object, depth: int) -> object:
        if depth > 100:
            raise _Damaged("containers nested more than 100 deep")
        if id(item) in done:
            return done[id(item)]
        if isinstance(item, _Array):
            result: object = item.numpy()
        elif isinstance(item, _DType):
            raise _Damaged("a dtype outside an array")
        elif isinstance(item, dict):
            result = type(item)(
                (walk(key, depth + 1), walk(val, depth + 1)) for key, val in item.items()
            )
        elif isinstance(item, list | tuple | set | frozenset):
            result = type(item)(walk(element, depth + 1) for element in item)
        elif isinstance(item, bytearray):  # (protocol 5) an immutable copy, lent to no one
            result = bytes(item)
        else:
            return item
        keep.append(item)
        done[id(item)] = result
        return result

    return walk(value, 0)


def read_array_pickle(path: str | os.PathLike[str], *, where: str = "read_array_pickle()") -> Any:
    """Read a pickle of containers and numpy arrays without running code from it.

    Args:
        path: the pickle file (protocols 0-5, written by Python 2 or 3, numpy 1.x or 2.x).
        where: the function named at the start of error messages.

    Returns:
        What the file holds, with numpy arrays in native byte order.

    Raises:
        DataError: the file can't be read, is damaged, or asks for anything other than
            containers, numbers, strings and numeric numpy arrays (the message names it).

    Example:
        >>> import pickle, tempfile, numpy as np
        >>> path = tempfile.mkdtemp() + "/a.pkl"
        >>> with open(path, "wb") as f:
        ...     pickle.dump({"x": np.arange(3, dtype=np.uint8), "rows": [0, 1]}, f)
        >>> stored = read_array_pickle(path)
        >>> stored["x"].tolist(), stored["rows"]
        ([0, 1, 2], [0, 1])
    """
    try:
        with open(path, "rb") as stream:
            if os.fstat(stream.fileno()).st_size == 0:
                raise _Damaged("nothing: the file is empty")
            # Read through a memory map: a damaged length field then meets the end of the
            # file instead of making the reader allocate that many bytes.
            with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return _finish(_Unpickler(mapped, encoding="latin1").load())
    except _Refused as refused:
        raise DataError(
            f"{where}: refused to read {os.fspath(path)!r}: it asks for {refused}, which is "
            "not a container, a number, a string or a numeric numpy array (a pickle that "
            "names other things can run code when loaded). Use the published files, or "
            "another layout."
        ) from None
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        AttributeError,
        IndexError,
        KeyError,
        TypeError,
        ValueError,
        LookupError,
        OverflowError,
        MemoryError,
        RecursionError,
        struct.error,
    ) as error:  # the ways unpickling fails on damaged bytes
        raise DataError(
            f"{where}: could not read {os.fspath(path)!r} ({type(error).__name__}: "
            f"{str(error)[:200]}). The file is truncated or damaged: download it again."
        ) from None
