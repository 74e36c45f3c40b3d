"""Memory plans: the fastest strategy whose estimated peak fits a budget, exact, or refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import fmaml
from fmaml.engine.strategy import candidates
from fmaml.errors import InputError
from fmaml.training.cli import main
from fmaml.training.config import parse_size

ROOT = Path(__file__).resolve().parents[1]


def omniglot_20_way(dtype=torch.float64, hidden=8, num_tasks=16, seed=0):
    """conv4 on Omniglot-shaped 20-way 1-shot tasks (one query per class), random pixels."""
    torch.manual_seed(seed)
    model = fmaml.nn.conv4(20, hidden=hidden, image_size=28).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tasks, 20, 1, 28, 28, generator=g, dtype=dtype)
    xq = torch.randn(num_tasks, 20, 1, 28, 28, generator=g, dtype=dtype)
    y = torch.arange(20).expand(num_tasks, -1)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    return loss_fn, fmaml.params_of(model), fmaml.Task((x, y), (xq, y))


def test_half_the_vmap_budget_gives_a_plan_within_it_and_the_same_meta_gradient():
    loss_fn, params, tasks = omniglot_20_way(num_tasks=8)
    inner = fmaml.InnerLoop(0.4, num_steps=5)
    whole = fmaml.plan_memory(loss_fn, params, tasks, inner, strategy=fmaml.Strategy())
    budget = whole.estimate // 2
    plan = fmaml.plan_memory(loss_fn, params, tasks, inner, memory_budget=budget)
    assert plan.estimate <= budget and plan.budget == budget
    assert plan.strategy == fmaml.auto_strategy(
        "cpu", loss_fn, memory_budget=budget, params=params, tasks=tasks, inner=inner
    )
    expected = fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=fmaml.Strategy())
    got = fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=plan.strategy)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    for k in params:
        torch.testing.assert_close(got[1].params[k], expected[1].params[k], rtol=1e-9, atol=1e-11)


def test_a_budget_no_plan_fits_is_refused_with_the_numbers_before_any_meta_step():
    loss_fn, params, tasks = omniglot_20_way(num_tasks=4)
    inner = fmaml.InnerLoop(0.4, num_steps=5)
    with pytest.raises(
        InputError,
        match=r"auto_strategy\(\): no plan fits the memory budget of 1\.0 kB: the smallest, "
        r"one task at a time.*needs about [0-9.]+ MB\. What would fit: .*first_order=True",
    ):
        fmaml.auto_strategy(
            "cpu", loss_fn, memory_budget=1000, params=params, tasks=tasks, inner=inner
        )
    with pytest.raises(TypeError, match=r"auto_strategy\(\): a memory_budget .* params="):
        fmaml.auto_strategy("cpu", loss_fn, memory_budget=10**9)
    with pytest.raises(InputError, match=r"plan_memory\(\): `memory_budget` must be a positive"):
        fmaml.plan_memory(loss_fn, params, tasks, inner, memory_budget=0)


def test_fewer_steps_are_suggested_when_they_would_fit():
    loss_fn, params, tasks = omniglot_20_way(num_tasks=2, hidden=32)
    inner = fmaml.InnerLoop(0.4, num_steps=200)
    one_step = fmaml.plan_memory(
        loss_fn,
        params,
        tasks,
        inner.replace(num_steps=10),
        strategy=fmaml.Strategy(chunk_size=1, checkpoint=True),
    )
    with pytest.raises(InputError, match=r"fewer inner steps \(about \d+ of 200"):
        fmaml.plan_memory(loss_fn, params, tasks, inner, memory_budget=one_step.estimate)


def test_the_candidates_go_from_the_fastest_to_fewer_tasks_to_recomputed_steps():
    names = [str(s) for s in candidates(fmaml.Strategy(), 16)]
    assert names == [
        "vmap over all tasks",
        "vmap over chunks of 8 tasks",
        "vmap over chunks of 4 tasks",
        "vmap over chunks of 2 tasks",
        "one task at a time",
        "vmap over all tasks, inner steps recomputed",
        "vmap over chunks of 8 tasks, inner steps recomputed",
        "vmap over chunks of 4 tasks, inner steps recomputed",
        "vmap over chunks of 2 tasks, inner steps recomputed",
        "one task at a time, inner steps recomputed",
    ]
    cpu = fmaml.Strategy(chunk_size=1, channels_last=True)
    assert [str(s) for s in candidates(cpu, 4)] == [
        "one task at a time, channels-last",
        "one task at a time, inner steps recomputed, channels-last",
    ]


def test_recomputing_makes_the_estimate_grow_with_the_carried_parameters_not_the_graphs():
    loss_fn, params, tasks = omniglot_20_way(num_tasks=2, hidden=16, dtype=torch.float32)
    kept, recomputed = [], []
    for steps in (5, 20):
        inner = fmaml.InnerLoop(0.4, num_steps=steps)
        for out, checkpoint in ((kept, False), (recomputed, True)):
            strategy = fmaml.Strategy(chunk_size=1, checkpoint=checkpoint)
            out.append(fmaml.plan_memory(loss_fn, params, tasks, inner, strategy=strategy).estimate)
    # kept: a step's whole graph per step; recomputed: its parameters and a tenth of one
    # step's graph (what the allocator keeps, fmaml.engine.memory.ALLOCATOR_SLACK)
    assert 0 < recomputed[1] - recomputed[0] < (kept[1] - kept[0]) / 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [("6GB", 6 * 10**9), ("500 MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1e9", 10**9)],
)
def test_sizes_are_read_in_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["six", "6XB", "-1GB", "0"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(InputError, match=r"--memory-budget: expected a positive size"):
        parse_size(text)


def test_train_with_a_budget_prints_the_plan_and_the_measured_peak(tmp_path):
    runner = CliRunner()
    args = ["train", "--dataset", "sinusoid", "--iterations", "2", "--out", str(tmp_path / "r")]
    done = runner.invoke(main, [*args, "--memory-budget", "2GB"])
    assert done.exit_code == 0, done.output
    line = done.output.strip().splitlines()[-1]
    assert line.startswith("memory: vmap over all tasks, 1 intra-op thread: about ")
    assert "(a budget of 2.0 GB); measured peak" in line
    refused = runner.invoke(main, [*args[:-1], str(tmp_path / "s"), "--memory-budget", "1kB"])
    assert refused.exit_code != 0
    assert "no plan fits the memory budget of 1.0 kB" in refused.output
    assert not (tmp_path / "s" / "latest.pt").exists()


MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    import fmaml
    from fmaml.training import peak
    from test_memory_plan import omniglot_20_way

    loss_fn, params, tasks = omniglot_20_way(torch.float32, hidden=64)
    inner = fmaml.InnerLoop(0.4, num_steps=5)
    whole = fmaml.plan_memory(loss_fn, params, tasks, inner, strategy=fmaml.Strategy())
    plan = fmaml.plan_memory(loss_fn, params, tasks, inner, memory_budget=whole.estimate // 2)
    small = fmaml.Task(*(tuple(t[:1] for t in pair) for pair in tasks))
    fmaml.value_and_grad(loss_fn, params, small, inner, strategy=plan.strategy)  # warm-up
    rest = peak.reset("cpu")
    fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=plan.strategy)
    print(json.dumps({{"budget": plan.budget, "estimate": plan.estimate,
                      "measured": peak.growth("cpu", rest), "strategy": str(plan.strategy)}}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_the_measured_peak_of_the_planned_meta_step_stays_within_the_budget():
    """Omniglot 20-way 1-shot, conv4-64, meta-batch 16, 5 second-order steps, float32: the
    budget is half the estimate of one vmap over all tasks; the peak resident memory of the
    planned meta-step (in a fresh process) stays within it, +10 % for the allocator."""
    script = MEASURE.format(tests=str(ROOT / "tests"))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["estimate"] <= row["budget"]
    assert 0 < row["measured"] <= 1.1 * row["budget"], row
