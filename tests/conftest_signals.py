"""Ctrl-C stops ``python -m pytest``, even while a test runs the command line in-process.

Click turns a ``KeyboardInterrupt`` inside a command into "Aborted!" and exit status 1, and
``CliRunner`` catches that exit: without help, a Ctrl-C during such a test ends that test
alone and the session goes on. The session's SIGINT handler (:func:`record_ctrl_c`) raises
``KeyboardInterrupt`` as Python's own does, and remembers the Ctrl-C; after the test,
:func:`stop_on_ctrl_c` ends the session. It also fails a test that leaves another SIGINT
handler behind (the command line must put back the one it found).

Not a conftest: ``tests/conftest.py`` imports the fixtures.
"""

from __future__ import annotations

import signal

import pytest

CTRL_C_EXIT = 2
"""pytest's own exit status for an interrupted session."""


class CtrlC:
    """Whether a Ctrl-C reached the session's handler since the session began."""

    seen = False


def record_ctrl_c(signum, frame) -> None:
    """The session's SIGINT handler: remember the Ctrl-C, then raise as Python's does."""
    CtrlC.seen = True
    raise KeyboardInterrupt


@pytest.fixture(autouse=True, scope="session")
def _record_ctrl_c():
    previous = signal.signal(signal.SIGINT, record_ctrl_c)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def stop_on_ctrl_c():
    """After each test: end the session if Ctrl-C was pressed during it; fail the test if it
    left a SIGINT handler other than the one it found."""
    before = signal.getsignal(signal.SIGINT)
    yield
    if CtrlC.seen:
        pytest.exit("Ctrl-C (caught inside an in-process command)", returncode=CTRL_C_EXIT)
    after = signal.getsignal(signal.SIGINT)
    assert after is before, f"the test left the SIGINT handler {after!r}, not {before!r}"
