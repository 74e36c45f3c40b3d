"""fmaml.load_run: a trained run in one call, adapted to a new task and used to predict."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest_images import folder_train_args, make_folder

import fmaml
from fmaml.tasks.sinusoid import SinusoidTasks
from fmaml.training.cli import main
from fmaml.training.train import restore_state

FAST = ["--val-every", "100", "--val-episodes", "4"]


def train(*args) -> None:
    result = CliRunner().invoke(main, ["train", *[str(a) for a in args], *FAST])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "sinusoid"
    train("--dataset", "sinusoid", "--iterations", "30", "--meta-batch", "8", "--hidden", "16",
          "--out", run)  # fmt: skip
    return run


def test_load_run_is_a_lazy_top_level_name():
    assert "load_run" in fmaml.__all__ and "load_run" in dir(fmaml)
    from fmaml.training.run import load_run

    assert fmaml.load_run is load_run


def test_a_sinusoid_run_adapts_to_new_tasks_and_predicts_better_than_unadapted(sinusoid_run):
    run = fmaml.load_run(sinusoid_run)
    assert run.path == sinusoid_run / "latest.pt" and run.iteration == 30
    assert run.config.dataset == "sinusoid" and run.inner.num_steps == 10
    assert run.inner.inner_lr == run.config.inner_lr == 0.01
    assert all(not p.requires_grad for p in run.params.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.params = {}
    tasks = SinusoidTasks(num_shots=10, num_query=50).sample(20, torch.Generator().manual_seed(7))
    before, after = [], []
    for t in range(20):
        support = (tasks.support[0][t], tasks.support[1][t])
        x, y = tasks.query[0][t], tasks.query[1][t]
        adapted = fmaml.adapt(run.loss_fn, run.params, support, run.inner)
        assert set(adapted) == set(run.params)
        prediction = run.predict(adapted, x)
        assert prediction.shape == y.shape
        torch.testing.assert_close(F.mse_loss(prediction, y), run.loss_fn(adapted, (x, y)))
        torch.testing.assert_close(run.adapt(support), adapted, rtol=0, atol=0)
        before.append(F.mse_loss(run.predict(run.params, x), y))
        after.append(F.mse_loss(prediction, y))
    before, after = torch.stack(before), torch.stack(after)
    assert after.mean() < before.mean(), (after.mean(), before.mean())
    assert (after < before).sum() >= 10, (after, before)  # on most tasks, not on average only


def test_an_image_run_adapts_and_predicts_logits(tmp_path, isolated_cache):
    images = tmp_path / "images"
    make_folder(images, {f"c{i}": 3 for i in range(6)})
    run_dir = tmp_path / "run"
    train(*folder_train_args(images, "0.34,0.33,0.33")[1:], "--iterations", "2", "--out", run_dir)
    run = fmaml.load_run(run_dir)
    assert run.path == run_dir / "best.pt" and run.config.dataset == "folder"
    assert run.inner.num_steps == run.config.eval_inner_steps
    task = next(restore_state(run.path).problem.episodes("test", 1, 0, 1))
    support = (task.support[0][0], task.support[1][0])
    x, y = task.query[0][0], task.query[1][0]
    adapted = fmaml.adapt(run.loss_fn, run.params, support, run.inner)
    logits = run.predict(adapted, x)
    assert logits.shape == (len(y), run.config.ways) and bool(logits.isfinite().all())
    per_shot = F.cross_entropy(logits, y, reduction="sum") / run.config.shots  # the MAML authors'
    torch.testing.assert_close(per_shot, run.loss_fn(adapted, (x, y)))
    accuracy = run.loss_fn.with_criterion(fmaml.accuracy)(adapted, (x, y))
    torch.testing.assert_close((logits.argmax(1) == y).float().mean(), accuracy)
    assert not torch.equal(logits, run.predict(run.params, x)), "adapting changed nothing"


def test_load_run_names_a_missing_run(tmp_path):
    with pytest.raises(fmaml.errors.FmamlError, match=r"no checkpoint in the run folder"):
        fmaml.load_run(tmp_path)
