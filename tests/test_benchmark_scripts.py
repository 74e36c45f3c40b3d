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
