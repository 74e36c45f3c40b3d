"""The experiment scripts in benchmarks/: what they time is what they say."""

from __future__ import annotations

import importlib.util
import math
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
@pytest.mark.slow
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


def test_sinusoid_reference_meta_gradient_equals_fmamls():
    """The independent sinusoid MAML computes the same meta-loss and meta-gradient as fmaml's
    training step (float64), so a gap between their results is not in the gradient."""
    import torch.nn.functional as F

    import fmaml

    reference = load("sinusoid_reference")
    model = fmaml.nn.mlp().double()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    tasks = fmaml.tasks.SinusoidTasks(num_shots=10).sample(
        25, torch.Generator().manual_seed(0), dtype=torch.float64
    )
    loss = fmaml.meta_loss(
        fmaml.supervised_loss(model, F.mse_loss), params, tasks, fmaml.InnerLoop(0.01)
    )
    grads = torch.autograd.grad(loss, list(params.values()))
    renamed = {"body.0": "0", "body.2": "2", "head": "4"}
    theirs = {
        f"{renamed[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v for k, v in params.items()
    }
    their_loss = reference.meta_loss(theirs, *tasks.support, *tasks.query)
    their_grads = torch.autograd.grad(their_loss, list(theirs.values()))
    torch.testing.assert_close(loss, their_loss, rtol=1e-12, atol=0)
    for mine, other in zip(grads, their_grads, strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_resnet12_memory_script_runs_and_strategies_agree():
    """Each setting in its own process; kept and recomputed inner steps give the same step:
    the same loss to the bit, every gradient element to float32 rounding (the recomputed
    backward sums in another order). Nothing here depends on the machine's load: the memory
    and seconds are reported, not checked (the peak can't go below 0 MB)."""
    script = load("resnet12_memory")
    rows = script.run(
        widths=(2, 2, 2, 2), num_tasks=1, steps=(2,), image_size=16, num_query=2, threads=1,
        keep_grads=True,
    )  # fmt: skip
    kept, recomputed = rows
    assert (kept["strategy"], recomputed["strategy"]) == ("kept", "recomputed")
    assert kept["num_steps"] == recomputed["num_steps"] == 2
    assert kept["loss"] == recomputed["loss"] and math.isfinite(kept["loss"])
    assert len(kept["grads"]) == len(recomputed["grads"]) > 0
    for mine, theirs in zip(kept["grads"], recomputed["grads"], strict=True):
        torch.testing.assert_close(torch.tensor(theirs), torch.tensor(mine), rtol=1e-5, atol=1e-6)
    assert kept["grad_norm"] > 0
    text = script.table(rows)
    assert "| 2 |" in text and text.rstrip().endswith("| yes |")


def test_resnet12_memory_table_of_a_step_that_needed_no_new_memory():
    """At tiny sizes a step can fit in memory the warm-up step left: 0 MB, no ratio."""
    row = {"num_steps": 2, "peak_mb": 0.0, "seconds": 0.1, "loss": 1.5, "grad_norm": 2.0}
    rows = [{**row, "strategy": "kept"}, {**row, "strategy": "recomputed"}]
    assert load("resnet12_memory").table(rows).splitlines()[-1] == (
        "| 2 | 0 | 0 | - | 0.1 | 0.1 | yes |"
    )


@pytest.mark.slow
def test_imaml_accuracy_script_agrees_where_the_inner_problem_is_well_posed():
    """lam 100 at rate 0.01 makes each pulled step land at params - 0.01 grad: solved in a
    few steps, I + H/lam positive definite, so the implicit gradient is the unrolled one."""
    result = load("imaml_accuracy").compare(lam=100.0, steps=8, lr=0.01)
    assert result["cos_cg50_unrolled"] > 0.99
    assert result["norm_unrolled"] == pytest.approx(result["norm_cg50"], rel=0.05)
