"""Every script in examples/ runs with --tiny and ends with a finite number.

The docs include these scripts (``--8<--`` snippets), so they are the code the guides show.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_images import OMNIGLOT_SUBSET, make_omniglot

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))
FINAL = re.compile(r"^final [^:]*: (\S+)$")


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tiny", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def final_value(output: str) -> float:
    last = output.strip().splitlines()[-1]
    match = FINAL.match(last)
    assert match, f"the last line should be 'final ...: NUMBER', got {last!r}"
    return float(match.group(1))


def test_the_six_examples_are_there_and_short():
    assert set(SCRIPTS) >= {
        "anil_partition.py",
        "learned_temperature.py",
        "memory_bounded.py",
        "omniglot_custom_module.py",
        "protomaml.py",
        "sinusoid_maml.py",
    }
    for name in SCRIPTS:
        lines = (EXAMPLES / name).read_text().splitlines()
        assert len(lines) < 100, f"{name} has {len(lines)} lines; keep examples under 100"


@pytest.mark.parametrize("name", [n for n in SCRIPTS if n != "omniglot_custom_module.py"])
def test_example_runs_tiny(name):
    assert math.isfinite(final_value(run_example(name)))


def test_omniglot_example_on_generated_images(tmp_path):
    alphabets = {f"Alphabet_{i}": 6 for i in range(4)}
    make_omniglot(tmp_path / "omniglot", alphabets, images_per_character=16)
    output = run_example("omniglot_custom_module.py", "--data-root", str(tmp_path / "omniglot"))
    assert "classes: train 18, test 6" in output
    assert 0.0 <= final_value(output) <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(not OMNIGLOT_SUBSET.is_dir(), reason="needs ../shared/data/omniglot")
def test_omniglot_example_on_the_shared_subset():
    output = run_example("omniglot_custom_module.py", "--data-root", str(OMNIGLOT_SUBSET))
    assert "classes: train 178, test 64" in output
    assert 0.0 <= final_value(output) <= 1.0
