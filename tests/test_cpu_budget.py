"""benchmarks/cpu_budget.py: a command is stopped with SIGINT once it has used its CPU budget."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_budget.py"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
@pytest.mark.slow
def test_a_busy_command_is_interrupted_at_its_budget():
    busy = "try:\n    while True:\n        x = 1\nexcept KeyboardInterrupt:\n    print('saved')\n"
    done = subprocess.run(
        [sys.executable, SCRIPT, "0.5", "--", sys.executable, "-c", busy],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "saved", "the command got SIGINT (KeyboardInterrupt)"
    assert "stopped at the budget" in done.stderr


@pytest.mark.slow
def test_a_command_that_ends_first_keeps_its_exit_status():
    done = subprocess.run(
        [sys.executable, SCRIPT, "100", "--", sys.executable, "-c", "raise SystemExit(3)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3 and "ended by itself; exit 3" in done.stderr


def test_usage_is_explained():
    done = subprocess.run([sys.executable, SCRIPT, "10"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr
