"""The benchmark runs, checks gradients before timing, and skips missing peers (no timings
are asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import fmaml.bench.harness as bench
from fmaml.training.cli import main

QUICK = {"repeats": 1, "min_seconds": 0.0, "orders": ["second"], "isolate": False}


@pytest.mark.slow
def test_run_bench_reports_every_figure():
    said = []
    rows = list(
        bench.run_bench(["sinusoid"], impls=["fmaml", "loop"], say=said.append, rounds=2, **QUICK)
    )
    assert [r["impl"] for r in rows] == ["fmaml", "loop"]
    assert all(len(r["round_seconds"]) == 2 for r in rows)
    for row in rows:
        for key in ("meta_steps_per_s", "tasks_per_s", "gflop_per_s", "peak_memory_mb", "device"):
            assert row[key]
        assert row["tasks_per_s"] == pytest.approx(25 * row["meta_steps_per_s"])
    assert rows[0]["strategy"] == "vmap over all tasks, 1 intra-op thread"  # an MLP on a CPU
    assert any("meta-gradients agree across fmaml, loop" in line for line in said)


def test_a_missing_peer_is_skipped_with_a_reason(monkeypatch):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("learn2learn", "higher") else real(name, *a),
    )
    said = []
    impls = ["fmaml", "learn2learn", "higher"]
    rows = list(bench.run_bench(["sinusoid"], impls=impls, compare=True, say=said.append, **QUICK))
    assert "skipped: learn2learn is not installed (see benchmarks/README.md)" in said
    assert "skipped: higher is not installed (see benchmarks/README.md)" in said
    assert [r["impl"] for r in rows] == ["fmaml"]


def test_a_different_meta_gradient_stops_the_benchmark(monkeypatch):
    real = bench.make_step

    def wrong(impl, problem, first_order, strategy=None):
        step = real(impl, problem, first_order, strategy)
        if impl != "fmaml":
            return step
        return lambda: [g * 1.001 for g in step()]

    monkeypatch.setattr(bench, "make_step", wrong)
    with pytest.raises(RuntimeError, match="give another meta-gradient than the loop"):
        list(bench.run_bench(["sinusoid"], impls=["fmaml", "loop"], **QUICK))


@pytest.mark.parametrize("image_size", [8, 32])  # stride-2 convolutions; max-pool
@pytest.mark.slow
def test_every_implementation_agrees_on_small_conv_nets(image_size):
    """All implementations, peers included when installed, in float64 on a small conv4."""
    setting = bench.Setting(
        "tiny", 2, 2, 0.4, ways=3, image_size=image_size, channels=1, hidden=4, query=2
    )
    impls = [
        i
        for i in bench.IMPLS
        if bench.peer_missing(i) is None and bench.not_applicable(i, setting) is None
    ]
    for first_order in (False, True):
        deviations = bench.gradient_check(setting, impls, first_order, dtype=torch.float64)
        assert max(deviations.values()) < 1e-10, deviations


@pytest.mark.slow
def test_measurement_in_a_subprocess_reports_its_own_peak_memory():
    result = bench._measure_in_subprocess(
        {
            "setting": "sinusoid",
            "order": "first",
            "impl": "fmaml",
            "repeats": 1,
            "device": "cpu",
            "min_seconds": 0.0,
            "threads": 1,
            "strategy": None,
        }
    )
    assert result["seconds_per_step"] > 0
    assert result["peak_memory_mb"] >= result["memory_before_mb"] > 0


def test_cli_bench_json_and_bad_options():
    runner = CliRunner()
    args = [
        "bench",
        "--settings",
        "sinusoid",
        "--orders",
        "first",
        "--impls",
        "fmaml",
        "--repeats",
        "1",
        "--min-seconds",
        "0",
        "--no-isolate",
        "--json",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows[0]["impl"] == "fmaml" and rows[0]["order"] == "first"
    result = runner.invoke(main, ["bench", "--chunk-size", "lots"])
    assert result.exit_code == 1 and "--chunk-size must be 'all' or a positive number" in (
        result.output
    )
    result = runner.invoke(main, ["bench", "--settings", "imagenet"])
    assert result.exit_code == 1 and "unknown settings ['imagenet']" in result.output


def test_interleaved_rates_warm_up_once_then_time_every_step_each_round():
    order = []
    steps = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    rates = bench.interleaved_rates(steps, rounds=3, seconds=0.0)
    assert order[:2] == ["a", "b"]  # one warm-up call each
    assert order[2:] == ["a", "a", "b", "b"] * 3  # rounds interleaved, at least 2 calls
    assert {k: len(v) for k, v in rates.items()} == {"a": 3, "b": 3}
    assert all(r > 0 for v in rates.values() for r in v)
