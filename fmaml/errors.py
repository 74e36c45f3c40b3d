"""The errors fmaml raises for things the user can fix: each message is complete on its own.

Every error here says what was expected, what was found and what to do, so the command line
prints it as one line (``fmaml --debug ...`` or ``FMAML_DEBUG=1`` adds the traceback). Any
other exception that reaches the command line is a bug in fmaml and keeps its traceback.

Each class also derives from the built-in error a caller would catch without knowing fmaml
(:class:`ValueError` for bad input, :class:`OSError` for a failed write,
:class:`FloatingPointError` for a diverged run), so ``except ValueError`` keeps working.

This module imports nothing of fmaml: every other module may use it.
"""

from __future__ import annotations

import functools
import os
import re

__all__ = [
    "ConfigError",
    "FmamlError",
    "InputError",
    "NonFiniteError",
    "WriteError",
    "check_positive_int",
    "public",
]


class FmamlError(Exception):
    """Base of the errors whose message tells the user what to do (no traceback needed)."""


class InputError(FmamlError, ValueError):
    """Settings, files or data that fmaml can't use as they are."""


class ConfigError(InputError):
    """A training or evaluation setting that can't work; the message names the option."""


class WriteError(FmamlError, OSError):
    """A file could not be written (a full disk, a read-only folder); nothing older was lost."""


class NonFiniteError(FmamlError, FloatingPointError):
    """Training met a NaN or infinite meta-loss or meta-gradient; the step was not taken."""


def check_positive_int(value: object, name: str, where: str) -> int:
    """``value`` if it is an int of at least 1 (not a bool).

    Raises:
        ConfigError: otherwise, naming ``where`` (the function) and ``name`` (the argument).

    Example:
        >>> check_positive_int(3, "num_ways", "sampler()")
        3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: `{name}` must be a positive int, got {value!r}.")
    return value


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_NAMED = re.compile(r"^[A-Za-z_][\w.]*\(\): ")


def public(fn):
    """Make the errors fmaml raises under ``fn`` name ``fn``: the function the user called.

    A ``ValueError`` or ``TypeError`` raised by fmaml's own code (its innermost frame is in
    the package) whose message starts with a function's name, ``"select(): ..."``, is renamed
    ``"fn(): ..."`` as it leaves ``fn``; nested public functions rename it in turn, so the
    outermost, the one the user called, names it. The traceback is kept; errors raised by
    torch or by the user's own code pass unchanged.

    Example:
        >>> from fmaml.tree import select
        >>> @public
        ... def pick(names, keys):
        ...     return select(names, keys)
        >>> pick(["w"], ["v"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: pick(): `adapt_keys` names parameters the model does not have...
    """
    name = fn.__name__

    @functools.wraps(fn)
    def named(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as error:
            _rename(error, name)
            raise

    return named


def _rename(error: Exception, name: str) -> None:
    if not error.args or not isinstance(error.args[0], str):
        return
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None or not frame.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        return
    renamed = _NAMED.sub(f"{name}(): ", error.args[0], count=1)
    error.args = (renamed, *error.args[1:])
