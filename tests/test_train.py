"""The training loop: checkpoints that resume exactly, atomic writes, clear failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fmaml.training.train as train_module
from fmaml.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fmaml.training.config import TrainConfig, resolve
from fmaml.training.train import evaluate_state, restore_state, train

ROOT = Path(__file__).resolve().parents[1]


def tiny(**changes) -> TrainConfig:
    values = dict(
        dataset="sinusoid",
        iterations=60,
        meta_batch=4,
        val_every=20,
        val_episodes=8,
        checkpoint_every=20,
        log_every=5,
        hidden=8,
    )
    values.update(changes)
    return TrainConfig(**values)


def params_equal(a, b) -> bool:
    return all(torch.equal(a[k].detach(), b[k].detach()) for k in a)


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
@pytest.mark.slow
def test_resume_in_process_gives_identical_parameters(tmp_path, algorithm):
    whole = train(tiny(algorithm=algorithm), tmp_path / "whole")
    train(tiny(algorithm=algorithm), tmp_path / "parts", iterations=40)
    resumed = train(None, tmp_path / "parts", resume=True)
    assert resumed.iteration == whole.iteration == 60
    assert params_equal(resumed.params, whole.params)
    if algorithm == "metasgd":
        assert params_equal(resumed.rates, whole.rates)
    lines = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["iteration"] for r in rows if r["split"] == "val"] == [20, 40, 60]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    """A real process, killed with SIGKILL mid-run, resumed: the same final parameters."""
    args = [
        "--dataset",
        "sinusoid",
        "--iterations",
        "1200",
        "--meta-batch",
        "5",
        "--hidden",
        "16",
        "--checkpoint-every",
        "100",
        "--val-every",
        "1000",
        "--val-episodes",
        "10",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "train", *args, "--out", str(run)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "latest.pt").exists() and load_checkpoint(run / "latest.pt")["iteration"] >= 300:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run / "latest.pt")["iteration"]
    assert 300 <= killed_at < 1200, "the run must be killed mid-way"
    subprocess.run(
        [sys.executable, "cli.py", "train", "--resume", str(run)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    straight = tmp_path / "straight"
    subprocess.run(
        [sys.executable, "cli.py", "train", *args, "--out", str(straight)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    a, b = load_checkpoint(run / "latest.pt"), load_checkpoint(straight / "latest.pt")
    assert a["iteration"] == b["iteration"] == 1200
    assert params_equal(a["params"], b["params"])
    assert torch.equal(a["generator"], b["generator"])


def test_checkpoint_holds_everything_to_resume(tmp_path):
    train(tiny(algorithm="metasgd"), tmp_path)
    saved = load_checkpoint(tmp_path / "latest.pt")
    assert {"config", "params", "rates", "optimizer", "generator", "iteration", "best"} <= set(
        saved
    )
    assert saved["optimizer"]["state"], "Adam moments are saved"
    assert TrainConfig.from_dict(saved["config"]) == resolve(tiny(algorithm="metasgd"))


def test_sinusoid_keeps_the_final_model_only(tmp_path):
    """The paper tests the final model; sinusoid validation tasks are not held out."""
    state = train(tiny(iterations=40), tmp_path)
    assert state.config.keep_best is False and not (tmp_path / "best.pt").exists()
    assert load_checkpoint(tmp_path / "latest.pt")["iteration"] == 40
    assert resolve(TrainConfig(dataset="omniglot")).keep_best is True


def test_best_checkpoint_tracks_lowest_validation_mse(tmp_path):
    state = train(tiny(keep_best=True), tmp_path)
    vals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in vals if r["split"] == "val"]
    best = min(vals, key=lambda r: r["score"])
    assert state.best["iteration"] == best["iteration"]
    assert load_checkpoint(tmp_path / "best.pt")["iteration"] == best["iteration"]


def test_nan_loss_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = train_module.value_and_grad
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, grads, score = real(*args, **kwargs)
        if calls["n"] <= 25:
            return loss, grads, score
        nan = [None if g is None else g * float("nan") for g in grads.wrt]
        return loss * float("nan"), grads._replace(wrt=nan), score

    monkeypatch.setattr(train_module, "value_and_grad", poisoned)
    with pytest.raises(
        FloatingPointError,
        match=r"meta-loss is nan at iteration 26.*"
        r"last good checkpoint: .*latest.pt",
    ):
        train(tiny(), tmp_path)
    saved = load_checkpoint(tmp_path / "latest.pt")
    assert saved["iteration"] == 20
    assert all(torch.isfinite(v).all() for v in saved["params"].values())


def test_atomic_write_keeps_the_old_checkpoint_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    train(tiny(iterations=2, checkpoint_every=1), tmp_path)
    assert load_checkpoint(path)["iteration"] == 2

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iteration": 3})
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "metrics.jsonl"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist. Pass a checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in the run folder"):
        load_checkpoint(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(
        CheckpointError, match=r"is not an fmaml checkpoint: found a torch file holding a dict"
    ):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(
        CheckpointError, match=r"garbage\.pt is not an fmaml checkpoint: found a text"
    ):
        load_checkpoint(tmp_path / "garbage.pt")
    train(tiny(iterations=1), tmp_path / "run")
    contents = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    torch.save({**contents, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99, written by a newer fmaml"):
        load_checkpoint(tmp_path / "future.pt")


def test_training_into_an_existing_run_is_refused(tmp_path):
    train(tiny(iterations=5), tmp_path)
    with pytest.raises(CheckpointError, match="already holds a run.*--resume"):
        train(tiny(iterations=5), tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("meta_batch", 0, "--meta-batch must be a positive integer, got 0"),
        ("inner_steps", -2, "--inner-steps must be a positive integer"),
        ("inner_lr", 0.0, "--inner-lr must be positive"),
        ("dataset", "imagenet", "unknown dataset 'imagenet'"),
    ],
)
def test_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        resolve(tiny(**{field: value}))


def test_evaluate_state_reports_every_step(tmp_path):
    train(tiny(), tmp_path)
    state = restore_state(tmp_path / "latest.pt")
    report = evaluate_state(state, num_episodes=50, num_steps=4, shots=5, query=5)
    assert report["episodes"] == 50 and len(report["steps"]) == 5
    again = evaluate_state(state, num_episodes=50, num_steps=4, shots=5, query=5)
    assert report == again, "fixed episodes: the same seed gives the same numbers"


def test_evaluate_state_refuses_ways_and_alphabets_for_sinusoid(tmp_path):
    state = train(tiny(iterations=2), tmp_path)
    with pytest.raises(ValueError, match=r"`ways` and `within_alphabet` apply to classification"):
        evaluate_state(state, num_episodes=4, ways=5)
    with pytest.raises(ValueError, match=r"a sinusoid task has one output"):
        evaluate_state(state, num_episodes=4, within_alphabet=True)


def test_evaluate_state_takes_another_inner_rate_unless_the_rates_are_learned(tmp_path):
    state = train(tiny(iterations=2), tmp_path / "maml")
    zero_ish = evaluate_state(state, num_episodes=8, num_steps=1, inner_lr=1e-12)
    assert zero_ish["inner_lr"] == 1e-12
    before, after = (s["mean"] for s in zero_ish["steps"])
    assert after == pytest.approx(before, rel=1e-6), "a vanishing rate leaves the model as it is"
    assert evaluate_state(state, num_episodes=8, num_steps=1)["inner_lr"] == 0.01
    with pytest.raises(ValueError, match=r"inner_lr must be positive, got 0\.0"):
        evaluate_state(state, num_episodes=8, inner_lr=0.0)
    learned = train(tiny(iterations=2, algorithm="metasgd"), tmp_path / "metasgd")
    assert evaluate_state(learned, num_episodes=8, num_steps=1)["inner_lr"] == "learned"
    with pytest.raises(ValueError, match=r"this metasgd run learned its inner rates"):
        evaluate_state(learned, num_episodes=8, inner_lr=0.1)


def test_a_head_for_more_ways_starts_every_row_at_the_mean_of_the_trained_rows():
    params = {
        "body.w": torch.randn(3, 2),
        "head.weight": torch.randn(2, 4),
        "head.bias": torch.tensor([1.0, 3.0]),
    }
    rates = [{"head.weight": torch.full((2, 4), 0.5), "head.bias": torch.tensor(0.1)}]
    resized = train_module._with_ways(params, 2, 5)
    assert torch.equal(resized["body.w"], params["body.w"])
    assert resized["head.bias"].tolist() == [2.0] * 5
    expected = params["head.weight"].mean(0).expand(5, 4)
    assert torch.allclose(resized["head.weight"], expected)
    (rate,) = train_module._with_ways(rates, 2, 5)
    assert rate["head.weight"].shape == (5, 4) and rate["head.bias"].shape == ()
    assert train_module._with_ways(None, 2, 5) is None


def test_the_strategy_is_chosen_saved_and_kept_on_resume(tmp_path):
    """A run's strategy: auto's choice with the config's fields replacing its own, saved in the
    config, the same after a restore; it changes how, not what, so results agree."""
    float64 = dict(dtype="float64", iterations=6, val_every=3, checkpoint_every=3)
    plain = train(tiny(**float64, strategy={"chunk_size": None}), tmp_path / "vmap")
    chunked = train(tiny(**float64, strategy={"chunk_size": 2, "threads": 1}), tmp_path / "c")
    assert str(chunked.strategy) == "vmap over chunks of 2 tasks, 1 intra-op thread"
    for name, value in plain.params.items():
        torch.testing.assert_close(chunked.params[name], value, rtol=1e-10, atol=1e-12)
    restored = restore_state(tmp_path / "c" / "latest.pt")
    assert restored.strategy == chunked.strategy
    assert restored.config.strategy == {"chunk_size": 2, "threads": 1}
    with pytest.raises(ValueError, match="unknown fields \\['chunks'\\]"):
        resolve(tiny(strategy={"chunks": 2}))
    with pytest.raises(ValueError, match="`workers` must be an integer of at least 1"):
        resolve(tiny(strategy={"workers": 0}))


@pytest.mark.skipif(
    shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler (c++)"
)
@pytest.mark.slow
def test_compiled_training_matches_eager_training(tmp_path):
    """Strategy(compile=True) on the sinusoid MLP, Meta-SGD (learned rates) in float64: the
    same parameters and rates as the uncompiled run after a few steps. Compiles once (~1 min)."""
    settings = dict(algorithm="metasgd", dtype="float64", iterations=4, val_every=4)
    eager = train(tiny(**settings), tmp_path / "eager")
    compiled = train(tiny(**settings, strategy={"compile": True}), tmp_path / "compiled")
    assert compiled.strategy.compile and not eager.strategy.compile
    for name, value in eager.params.items():
        torch.testing.assert_close(compiled.params[name], value, rtol=1e-9, atol=1e-12)
    for name, value in eager.rates.items():
        torch.testing.assert_close(compiled.rates[name], value, rtol=1e-9, atol=1e-12)

    def logged(run):
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r) for r in rows if json.loads(r)["split"] == "train"]

    for a, b in zip(logged("compiled"), logged("eager"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9)
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-9)


@pytest.mark.slow
def test_ctrl_c_saves_the_step_it_stopped_at_and_resumes_exactly(tmp_path):
    """SIGINT: the run finishes its step, saves it (not only the last periodic checkpoint) and
    exits 130; resumed, it ends where an uninterrupted run ends."""
    args = ["--dataset", "sinusoid", "--meta-batch", "5", "--hidden", "16", "--val-every"]
    args += ["100000", "--val-episodes", "10", "--checkpoint-every", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "train", *args, "--iterations", "100000", "--out", str(run)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 200):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted: stopped after iteration" in output and "Traceback" not in output
    stopped_at = load_checkpoint(run / "latest.pt")["iteration"]
    logged = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert 0 < max(logged) <= stopped_at < 100000  # no periodic checkpoint was due
    total = str(stopped_at + 7)
    resumed = subprocess.run(
        [sys.executable, "cli.py", "train", "--resume", str(run), "--iterations", total],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    straight = tmp_path / "straight"
    subprocess.run(
        [sys.executable, "cli.py", "train", *args, "--iterations", total, "--out", str(straight)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    a, b = load_checkpoint(run / "latest.pt"), load_checkpoint(straight / "latest.pt")
    assert a["iteration"] == b["iteration"] == stopped_at + 7
    assert params_equal(a["params"], b["params"])
    assert torch.equal(a["generator"], b["generator"])
