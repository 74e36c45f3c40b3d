"""The experiment scripts in benchmarks/: what they time is what they say."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from fmaml.bench import SETTINGS, build

SCRIPTS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("first_order", [False, True])
def test_ceiling_arrangements_compute_every_task(first_order):
    ceiling = load("ceiling")
    problem = build(SETTINGS["omniglot"], dtype=torch.float64, num_tasks=3)
    steps = ceiling.passes(problem, first_order)
    per_task, two_workers = steps["per-task"](), steps["per-task-2-workers"]()
    for a, b in zip(per_task, two_workers, strict=True):  # all 3 tasks, on either thread
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert [g.shape for g in steps["one-batch"]()] == [g.shape for g in per_task]


def test_two_phase_meta_gradient_is_exact():
    assert load("two_phase").check("omniglot") < 1e-12


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler (c++)"
)
def test_compiled_per_task_meta_gradient_equals_eager():
    assert load("compiled_per_task").check("omniglot", num_tasks=2) < 1e-12


def test_resnet12_memory_script_runs_and_strategies_agree():
    """Each setting in its own process; kept and recomputed inner steps give the same step."""
    script = load("resnet12_memory")
    rows = script.run(
        widths=(2, 2, 2, 2), num_tasks=1, steps=(2,), image_size=16, num_query=2, threads=1
    )
    kept, recomputed = rows
    assert (kept["strategy"], recomputed["strategy"]) == ("kept", "recomputed")
    assert kept["num_steps"] == recomputed["num_steps"] == 2
    assert kept["peak_mb"] > 0 and recomputed["peak_mb"] > 0
    assert kept["loss"] == pytest.approx(recomputed["loss"], rel=1e-5)
    assert kept["grad_norm"] == pytest.approx(recomputed["grad_norm"], rel=1e-4)
    assert kept["grad_norm"] > 0
    text = script.table(rows)
    assert "| 2 |" in text and text.rstrip().endswith("| yes |")
