"""The run folder as the user sees it: resumes that equal an uninterrupted run, file by file
and `test` result by result; a full disk; non-finite meta-gradients."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from click.testing import CliRunner
from conftest_images import folder_train_args, isolated_cache, make_folder

import fmaml.training.checkpoint as checkpoint_module
import fmaml.training.cli as cli_module
import fmaml.training.train as train_module
from fmaml.errors import NonFiniteError, WriteError
from fmaml.training.checkpoint import load_checkpoint, save_checkpoint
from fmaml.training.cli import main
from fmaml.training.config import TrainConfig
from fmaml.training.train import train

_ = isolated_cache


@pytest.fixture(autouse=True)
def _cache_in_tmp(isolated_cache):
    return isolated_cache


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    make_folder(root, {f"c{i}": 4 for i in range(10)})
    return root


def train_args(images, split: str) -> list:
    return [
        *folder_train_args(images, split),
        "--val-every", "2", "--val-episodes", "4", "--checkpoint-every", "3",
    ]  # fmt: skip


def checkpoint_contents(path) -> dict:
    return load_checkpoint(path)


def assert_same(a, b, where: str = "") -> None:
    """Equal nested containers of tensors (bit for bit), numbers and strings."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def metrics(run) -> list[dict]:
    """The rows of metrics.jsonl without the wall-clock rate (it differs between any runs)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tasks_per_s"} for row in rows]


def test_results(run) -> list[dict]:
    reports = []
    for name in ("best.pt", "latest.pt"):
        result = invoke("test", "--checkpoint", run / name, "--episodes", "6", "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.output.strip().splitlines()[-1])
        reports.append({k: v for k, v in report.items() if k != "checkpoint"})
    return reports


def assert_runs_equal(run, whole) -> None:
    for name in ("best.pt", "latest.pt"):
        assert_same(checkpoint_contents(run / name), checkpoint_contents(whole / name), name)
    assert metrics(run) == metrics(whole)
    assert test_results(run) == test_results(whole)


test_results.__test__ = False  # a helper, not a test


@pytest.mark.slow
def test_a_4_plus_4_run_without_validation_has_iteration_8_in_best_pt(tmp_path, images):
    args = train_args(images, "0.8,0,0.2")
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert invoke(*args, "--iterations", "8", "--out", whole).exit_code == 0
    first = invoke(*args, "--iterations", "4", "--out", run)
    assert first.exit_code == 0, first.output
    assert load_checkpoint(run / "best.pt")["iteration"] == 4
    second = invoke("train", "--resume", run, "--iterations", "8")
    assert second.exit_code == 0, second.output
    assert load_checkpoint(run / "best.pt")["iteration"] == 8
    assert load_checkpoint(run / "best.pt")["config"]["iterations"] == 8
    for name in ("best.pt", "latest.pt"):
        assert_same(checkpoint_contents(run / name), checkpoint_contents(whole / name), name)
    assert test_results(run) == test_results(whole)


@pytest.mark.parametrize("split", ["0.8,0,0.2", "0.6,0.2,0.2"], ids=["no-val", "val"])
@pytest.mark.parametrize("stops", [[1], [3], [2, 5], [1, 2, 4, 6]])
@pytest.mark.slow
def test_interrupted_and_resumed_runs_equal_an_uninterrupted_one(
    tmp_path, images, monkeypatch, split, stops
):
    """Ctrl-C at the given iterations, `train --resume` after each: every file in the run
    folder and every `test` result equal those of a run that was never interrupted."""
    args = [*train_args(images, split), "--iterations", "7"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert invoke(*args, "--out", whole).exit_code == 0

    pending = list(stops)

    class CtrlC:  # what the CLI's SIGINT handler reports, at the chosen iterations
        requested = False

        def __init__(self):
            self.seen = 0

        def __call__(self):
            self.seen += 1
            if pending and self.seen == pending[0] - self.offset:
                pending.pop(0)
                CtrlC.requested = True
            return CtrlC.requested

        def restore(self):
            pass

    offset = {"value": 0}

    def make():
        interrupt = CtrlC()
        interrupt.offset = offset["value"]
        CtrlC.requested = False
        return interrupt

    monkeypatch.setattr(cli_module, "_Interrupt", make)
    result = invoke(*args, "--out", run)
    for stop in stops:
        assert result.exit_code == 130, result.output
        assert f"stopped after iteration {stop}" in result.output
        assert load_checkpoint(run / "latest.pt")["iteration"] == stop
        offset["value"] = stop
        result = invoke("train", "--resume", run)
    assert result.exit_code == 0, result.output
    assert_runs_equal(run, whole)


def test_a_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path, images):
    args = [*train_args(images, "0.8,0,0.2"), "--iterations", "6"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert invoke(*args, "--out", whole).exit_code == 0
    assert invoke(*args[:-1], "3", "--out", run).exit_code == 0  # 3 of 6: a checkpoint at 3
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"iteration": 4, "split": "tr')  # killed while writing the next row
    result = invoke("train", "--resume", run, "--iterations", "6")
    assert result.exit_code == 0, result.output
    rows = metrics(run)  # the rows of the first part's end (3), then the whole run's
    assert [r["iteration"] for r in rows] == [3, 6]
    assert rows[1:] == metrics(whole)


def test_a_damaged_metrics_row_before_the_last_is_a_clear_error(tmp_path, images):
    run = tmp_path / "run"
    args = [*train_args(images, "0.8,0,0.2"), "--iterations", "3"]
    assert invoke(*args, "--out", run).exit_code == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["garbage", *rows]) + "\n")
    result = invoke("train", "--resume", run, "--iterations", "6")
    assert result.exit_code == 1
    assert "line 1 of" in result.output and "is not a metrics row" in result.output


# ----------------------------------------------------------------- a full disk


def tiny(**changes) -> TrainConfig:
    values = dict(
        dataset="sinusoid",
        iterations=6,
        meta_batch=2,
        val_every=100,
        val_episodes=2,
        checkpoint_every=2,
        log_every=1,
        hidden=4,
    )
    return TrainConfig(**(values | changes))


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save = torch.save
    saves = {"n": 0}

    def fill_the_disk(obj, stream):
        saves["n"] += 1
        if saves["n"] == 1:  # the checkpoint at iteration 2 is written, the next one is not
            return real_save(obj, stream)
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", fill_the_disk)
    with pytest.raises(
        WriteError,
        match=r"could not write the checkpoint .*latest\.pt \(No space left on device\); the "
        r"previous latest\.pt is intact\. Free space .*--resume",
    ):
        train(tiny(), tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "latest.pt")["iteration"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "metrics.jsonl"]
    resumed = train(None, tmp_path, resume=True)  # once there is space again
    assert resumed.iteration == 6


def test_a_full_disk_at_the_first_checkpoint_says_nothing_was_there(tmp_path, monkeypatch):
    def full(obj, stream):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(WriteError, match=r"no earlier latest\.pt existed"):
        save_checkpoint(tmp_path / "latest.pt", {"iteration": 1})
    assert not list(tmp_path.iterdir())


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
    def full(obj, stream):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    result = invoke(
        "train", "--dataset", "sinusoid", "--iterations", "2", "--hidden", "4",
        "--checkpoint-every", "1", "--out", tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "Traceback" not in result.output


# ------------------------------------------------------ non-finite meta-gradients


def poison_gradient_from(monkeypatch, iteration: int) -> None:
    """From ``iteration`` on, the meta-loss stays finite but its gradient is NaN."""
    real = train_module.value_and_grad
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, grads, score = real(*args, **kwargs)
        if calls["n"] >= iteration:  # the first input's gradient NaN, the loss as it was
            first, *rest = grads.wrt
            grads = grads._replace(wrt=[torch.full_like(first, float("nan")), *rest])
        return loss, grads, score

    monkeypatch.setattr(train_module, "value_and_grad", poisoned)


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_a_non_finite_meta_gradient_stops_training_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, grad_clip
):
    poison_gradient_from(monkeypatch, 5)
    with pytest.raises(
        NonFiniteError,
        match=r"meta-gradient of .* is NaN or infinite at iteration 5 \(the meta-loss is "
        r"finite\); the step was not taken.*last good checkpoint: .*latest\.pt \(iteration 4\)",
    ):
        train(tiny(grad_clip=grad_clip), tmp_path)
    saved = load_checkpoint(tmp_path / "latest.pt")
    assert saved["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in saved["params"].values())


def test_clipping_never_turns_a_nan_into_a_number(tmp_path, monkeypatch):
    """With clipping, the NaN gradient is refused as it is without: no step is taken."""
    state = train_module.init_state(
        train_module.resolve(tiny(grad_clip=1e-3, checkpoint_every=100))
    )
    before = {k: v.detach().clone() for k, v in state.params.items()}
    poison_gradient_from(monkeypatch, 1)
    with pytest.raises(NonFiniteError):
        train_module.meta_step(state)
    assert state.iteration == 0
    assert all(torch.equal(before[k], state.params[k].detach()) for k in before)
    assert all(leaf.grad is None for leaf in state.leaves())
