"""Ctrl-C and the command line: ``train`` stops gracefully in its own process, always puts
back the SIGINT handler it found, and a Ctrl-C stops ``python -m pytest`` even while a test
runs a command in-process (:mod:`conftest_signals`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest_signals import CTRL_C_EXIT, record_ctrl_c

import fmaml.training.train as train_module
from fmaml.errors import NonFiniteError
from fmaml.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
HELPER = "FMAML_TEST_CTRL_C_MARKER"
"""Set by :func:`test_ctrl_c_stops_the_session_during_an_in_process_train` for its helpers."""

TRAIN = ["train", "--dataset", "sinusoid", "--meta-batch", "2", "--hidden", "4"]
TRAIN += ["--val-every", "100", "--val-episodes", "2", "--iterations", "4"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def python_default_handler():
    """Python's own SIGINT handler for the test (as in `python cli.py`), then the one before."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def watch_steps(monkeypatch, at_step=None, *, ctrl_c=None, fail=False) -> list:
    """Wrap ``meta_step``: record the SIGINT handler at each step; at step ``at_step`` press
    Ctrl-C (``ctrl_c``) or fail with a NonFiniteError (``fail``)."""
    real, handlers = train_module.meta_step, []

    def step(state, ranks=None):
        handlers.append(signal.getsignal(signal.SIGINT))
        if len(handlers) == at_step and ctrl_c:
            signal.raise_signal(signal.SIGINT)
        if len(handlers) == at_step and fail:
            raise NonFiniteError("the meta-loss is nan (a test)")
        return real(state, ranks)

    monkeypatch.setattr(train_module, "meta_step", step)
    return handlers


def test_train_takes_over_python_s_handler_and_puts_it_back(
    tmp_path, monkeypatch, python_default_handler
):
    handlers = watch_steps(monkeypatch)
    result = invoke(*TRAIN, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert len(handlers) == 4
    assert all(getattr(h, "__name__", "") == "_request" for h in handlers)  # the graceful stop
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_train_leaves_a_handler_someone_else_installed_alone(tmp_path, monkeypatch):
    assert signal.getsignal(signal.SIGINT) is record_ctrl_c  # the test session's
    handlers = watch_steps(monkeypatch)
    result = invoke(*TRAIN, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert handlers == [record_ctrl_c] * 4
    assert signal.getsignal(signal.SIGINT) is record_ctrl_c


def test_a_failed_train_puts_the_handler_back(tmp_path, monkeypatch, python_default_handler):
    handlers = watch_steps(monkeypatch, 2, fail=True)
    result = invoke(*TRAIN, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "the meta-loss is nan (a test)" in result.output
    assert len(handlers) == 2 and getattr(handlers[0], "__name__", "") == "_request"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_process_stops_after_the_step_and_puts_the_handler_back(
    tmp_path, monkeypatch, python_default_handler
):
    watch_steps(monkeypatch, 2, ctrl_c=True)
    result = invoke(*TRAIN, "--out", tmp_path / "run")
    assert result.exit_code == 130, result.output
    assert "interrupted: stopped after iteration 2" in result.output
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_ctrl_c_stops_the_session_during_an_in_process_train(tmp_path):
    """A real pytest session: Ctrl-C during an in-process `train` (whose exit CliRunner
    catches) ends the session with pytest's status 2; the next test does not run."""
    marker = tmp_path / "the next test ran"
    here = Path(__file__)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{here}::test_helper_ctrl_c_during_train", f"{here}::test_helper_the_next_test"],
        cwd=ROOT, env={**os.environ, HELPER: str(marker)}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == CTRL_C_EXIT, done.stdout + done.stderr
    assert "Ctrl-C (caught inside an in-process command)" in done.stdout + done.stderr
    assert not marker.exists()


helper = pytest.mark.skipif(
    HELPER not in os.environ,
    reason="run by test_ctrl_c_stops_the_session_during_an_in_process_train",
)


@helper
def test_helper_ctrl_c_during_train(tmp_path, monkeypatch):
    watch_steps(monkeypatch, 2, ctrl_c=True)
    invoke(*TRAIN, "--out", tmp_path / "run")  # caught by click and CliRunner


@helper
def test_helper_the_next_test():
    Path(os.environ[HELPER]).write_text("ran")
