"""The command line, through click's CliRunner and once as a real process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest_images import OMNIGLOT_SUBSET, folder_train_args, make_folder, make_omniglot

from fmaml.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--val-every", "5", "--val-episodes", "4", "--checkpoint-every", "5"]


def invoke(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_sinusoid_train_test_plot(tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--dataset",
        "sinusoid",
        "--iterations",
        "10",
        "--meta-batch",
        "4",
        "--hidden",
        "8",
        "--out",
        run,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert {"latest.pt", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert not (run / "best.pt").exists(), "sinusoid: the final model is tested, as in the paper"
    assert "the final model latest.pt (iteration 10) is the one to test" in result.output
    result = invoke("test", "--checkpoint", run, "--episodes", "20", "--json")
    assert result.exit_code == 0, result.output
    assert f"checkpoint {run / 'latest.pt'}: iteration 10 of 10, the final model" in result.output
    assert "K=5 MSE after each inner step (0 = before adapting): 0: " in result.output
    report = last_json(result.output)
    assert report["checkpoint"] == str(run / "latest.pt") and report["iteration"] == 10
    assert report["episodes"] == 20 and set(report["results"]) == {"K=5", "K=10"}
    assert {"1", "5", "10"} <= set(report["results"]["K=5"])
    assert "sinusoid K=5, MSE on 20 tasks (inner rate 0.01)  1 step:" in result.output
    slower = invoke("test", "--checkpoint", run, "--episodes", "20", "--inner-lr", "0.001")
    assert "sinusoid K=5, MSE on 20 tasks (inner rate 0.001)  1 step:" in slower.output
    refused = invoke("test", "--checkpoint", run, "--ways", "5")
    assert refused.exit_code == 2 and "--ways and --within-alphabet apply to classification" in (
        refused.output
    )
    result = invoke("plot", run)
    assert result.exit_code == 0, result.output
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_to_a_new_total(tmp_path):
    run = tmp_path / "run"
    assert (
        invoke(
            "train",
            "--dataset",
            "sinusoid",
            "--iterations",
            "10",
            "--hidden",
            "8",
            "--out",
            run,
            "--chunk-size",
            "2",
            "--workers",
            "2",
            *FAST,
        ).exit_code
        == 0
    )
    refused = invoke("train", "--resume", run, "--iterations", "15", "--workers", "1")
    assert refused.exit_code == 2 and "can't change on --resume" in refused.output
    result = invoke("train", "--resume", run, "--iterations", "15")
    assert result.exit_code == 0, result.output
    assert "done: 15 iterations" in result.output
    assert "strategy: vmap over chunks of 2 tasks, 2 workers" in result.output


@pytest.mark.slow
def test_folder_dataset_train_and_test(tmp_path, isolated_cache):
    make_folder(tmp_path / "images", {f"class{i}": 6 for i in range(10)})
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--dataset",
        "folder",
        "--data-root",
        tmp_path / "images",
        "--split",
        "0.6,0.2,0.2",
        "--ways",
        "2",
        "--shots",
        "1",
        "--query",
        "2",
        "--meta-batch",
        "2",
        "--image-size",
        "12",
        "--hidden",
        "4",
        "--iterations",
        "6",
        "--out",
        run,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert "classes: train 6, val 2, test 2; split 0.6,0.2,0.2, split seed 0" in result.output
    result = invoke("test", "--checkpoint", run, "--episodes", "10", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result.output)
    assert report["episodes"] == 10 and report["query_per_class"] == 2
    assert report["classes_split_by"] == "0.6,0.2,0.2" and report["split_seed"] == 0
    assert 0 <= report["accuracy"] <= 100 and report["ci95"] >= 0
    assert report["inner_steps"] == 10, "the paper's test-time steps for 84x84 data"
    assert "accuracy" in result.output and "95% CI" in result.output


def test_test_names_an_inner_step_that_scored_better_than_the_headline(
    tmp_path, isolated_cache, monkeypatch
):
    """A brief run can peak at an earlier step than the protocol's: `test` says which (here
    the per-step means are replaced by those of a 200-iteration Omniglot model)."""
    import fmaml.training.train as train_module

    make_folder(tmp_path / "images", {f"class{i}": 4 for i in range(6)})
    run = tmp_path / "run"
    args = folder_train_args(tmp_path / "images", "0.34,0.33,0.33")
    result = invoke(*args, "--iterations", "1", "--out", run, *FAST)
    assert result.exit_code == 0, result.output
    real = train_module.evaluate_state

    def peaks_early(*args, **kwargs):
        result = real(*args, **kwargs)
        means = [0.20, 0.515, 0.30, 0.23]
        result["steps"] = [
            {**result["steps"][0], "step": i, "mean": m} for i, m in enumerate(means)
        ]
        result["inner_steps"] = 3
        return result

    monkeypatch.setattr(train_module, "evaluate_state", peaks_early)
    result = invoke("test", "--checkpoint", run, "--episodes", "4", "--json")
    assert result.exit_code == 0, result.output
    assert "accuracy 23.00 ± " in result.output and "% after 3 inner steps" in result.output
    assert "  note: inner step 1 scored best, 51.50 ± " in result.output
    assert "above the 23.00 % after 3 steps reported above" in result.output
    assert "--inner-steps 1 tests at that step." in result.output
    assert last_json(result.output)["best_step"] == 1
    monkeypatch.setattr(train_module, "evaluate_state", real)
    result = invoke("test", "--checkpoint", run, "--episodes", "4", "--json")
    report = last_json(result.output)
    said = "note: inner step" in result.output
    assert said == (report["best_step"] != report["inner_steps"]), result.output


def test_train_and_sinusoid_test_name_an_inner_step_that_scored_better(tmp_path):
    from fmaml.training.cli import best_step

    run = tmp_path / "run"
    args = ["train", "--dataset", "sinusoid", "--meta-batch", "4", "--hidden", "8", *FAST]
    trained = invoke(*args, "--iterations", "2", "--out", run)
    assert trained.exit_code == 0, trained.output
    # the last validation (the final model's) decides whether train adds the note
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["split"] == "val" and len(final["score_per_step"]) == 11
    early = best_step(final["score_per_step"], higher_is_better=False)
    assert ("note: on validation, the final model scored best" in trained.output) == (
        early is not None
    )
    # a test inner rate far too large: the loss grows with the steps, so an earlier step wins
    result = invoke("test", "--checkpoint", run, "--episodes", "8", "--shots", "5",
                    "--inner-steps", "4", "--inner-lr", "5", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    per_step = last_json(result.output)["results"]["K=5"]
    mse = [per_step[str(step)]["mse"] for step in range(5)]
    best = best_step(mse, higher_is_better=False)
    assert best is not None and best < 4, mse
    assert f"  note: K=5 inner step {best} scored best, MSE {mse[best]:.3f} ± " in result.output
    assert "steps (the headline, as the protocol asks;" in result.output


def test_the_train_note_names_the_best_step_of_the_model_to_test():
    from types import SimpleNamespace

    from fmaml.training.cli import _best_step_note

    problem = SimpleNamespace(score_name="accuracy", higher_is_better=True)
    best = {
        "iteration": 200,
        "score": 0.23,
        "ci95": 0.01,
        "score_per_step": [0.2, 0.515, 0.3, 0.23],
    }
    state = SimpleNamespace(config=SimpleNamespace(keep_best=True), problem=problem, best=best)
    assert _best_step_note(state, [0.2, 0.3, 0.4, 0.5]) == (
        "note: on validation, best.pt (iteration 200) scored best after inner step 1: accuracy "
        "51.50 %, above the 23.00 % after 3 steps that validation and test report (the run's "
        "test setting, as the protocol asks; a model trained briefly often peaks early). "
        "`test --inner-steps 1` tests at that step."
    )
    final = SimpleNamespace(config=SimpleNamespace(keep_best=False), problem=problem, best={})
    assert _best_step_note(final, [0.2, 0.3, 0.4, 0.5]) is None  # the last step is the best
    assert "the final model scored best after inner step 2: accuracy 60.00 %" in (
        _best_step_note(final, [0.2, 0.3, 0.6, 0.5])
    )


def test_omniglot_layout_with_validation_split(tmp_path, isolated_cache):
    make_omniglot(tmp_path / "omni", {f"Alpha{i}": 3 for i in range(4)}, images_per_character=4)
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--data-root",
        tmp_path / "omni",
        "--split",
        "alphabet:0.5,0.25,0.25",
        "--ways",
        "2",
        "--meta-batch",
        "2",
        "--hidden",
        "4",
        "--iterations",
        "5",
        "--no-download",
        "--out",
        run,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "val" for r in rows)
    result = invoke(
        "test",
        "--checkpoint",
        run / "best.pt",
        "--split",
        "val",
        "--episodes",
        "4",
        "--query",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert last_json(result.output)["query_per_class"] == 2


def train_small_omniglot(tmp_path, *extra):
    """2-way Omniglot on 4 generated alphabets: A, B of 4 characters, C, D of 2; one trains."""
    sizes = {"AlphaA": 4, "AlphaB": 4, "AlphaC": 2, "AlphaD": 2}
    make_omniglot(tmp_path / "omni", sizes, images_per_character=4)
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--data-root",
        tmp_path / "omni",
        "--split",
        "alphabet:0.25,0,0.75",
        "--ways",
        "2",
        "--meta-batch",
        "2",
        "--hidden",
        "4",
        "--iterations",
        "5",
        "--no-download",
        "--out",
        run,
        *FAST,
        *extra,
    )
    assert result.exit_code == 0, result.output
    return run, sizes, result


def test_within_alphabet_test_of_a_2_way_model_at_3_ways(tmp_path, isolated_cache):
    run, sizes, trained = train_small_omniglot(tmp_path)
    assert "no validation split, so best.pt is the final model (iteration 5)" in trained.output
    assert "nan" not in trained.output
    args = ["test", "--checkpoint", run, "--episodes", "12", "--inner-steps", "2"]
    result = invoke(*args, "--within-alphabet", "--ways", "3", "--shots", "1", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result.output)
    assert report["protocol"] == "within-alphabet" and report["ways"] == 3
    assert report["trained_ways"] == 2 and report["iteration"] == 5
    assert report["checkpoint"] == str(run / "best.pt")
    used, skipped = report["alphabets"], report["skipped_alphabets"]
    assert all(sizes[name] == n >= 3 for name, n in used.items()) and used
    assert all(sizes[name] == n < 3 for name, n in skipped.items()) and skipped
    assert len(used) + len(skipped) == 3, "the three test alphabets"
    assert len(report["accuracy_per_step"]) == len(report["ci95_per_step"]) == 3
    assert report["accuracy"] == report["accuracy_per_step"][-1]
    # equal head rows: equal logits before adapting, so the first class is always picked
    assert report["accuracy_per_step"][0] == pytest.approx(100 / 3)
    text = result.output
    assert f"checkpoint {run / 'best.pt'}: iteration 5 of 5, the final model" in text
    assert "omniglot 3-way 1-shot, within-alphabet (" in text
    steps = text.split("accuracy after each inner step (0 = before adapting): ")[1]
    assert all(f"{s}: " in steps.splitlines()[0] for s in range(3))
    assert "with fewer than 3 characters: " in text
    assert "each of the 3 head rows starts at the mean of the 2 trained rows" in text

    assert report["inner_lr"] == 0.4 and "after 2 inner steps at 0.4 " in text
    across = invoke(*args, "--inner-lr", "0.1", "--json")
    assert across.exit_code == 0, across.output
    report = last_json(across.output)
    assert report["protocol"] == "across-alphabets" and report["ways"] == 2
    assert report["inner_lr"] == 0.1
    assert "omniglot 2-way 1-shot, across-alphabets, test split (alphabet:" in across.output
    refused = invoke(*args, "--within-alphabet", "--ways", "5")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "5-way tasks need a group with at least 5 classes, but the largest has 4" in (
        refused.output
    )


def test_training_within_one_alphabet(tmp_path, isolated_cache):
    run, _, trained = train_small_omniglot(tmp_path, "--within-alphabet")
    assert "tasks within one alphabet (2-way), no training alphabet skipped" in trained.output
    result = invoke("test", "--checkpoint", run, "--episodes", "6", "--json")
    assert result.exit_code == 0, result.output
    assert last_json(result.output)["protocol"] == "within-alphabet", "the run's protocol"


@pytest.mark.parametrize("flag, pooled", [("--max-pool", True), ("--stride", False)])
def test_max_pool_or_stride_reaches_the_model_and_the_checkpoint(
    tmp_path, isolated_cache, flag, pooled
):
    from fmaml.training.train import restore_state

    run, _, _ = train_small_omniglot(tmp_path, flag)
    state = restore_state(run / "latest.pt")
    assert state.config.max_pool is pooled
    block = state.problem.model.body.block0
    assert hasattr(block, "pool") is pooled
    assert block.conv.stride == ((1, 1) if pooled else (2, 2))
    result = invoke("test", "--checkpoint", run / "latest.pt", "--episodes", "4")
    assert result.exit_code == 0, result.output


def test_resnet12_trains_and_tests_from_the_command_line(tmp_path, isolated_cache):
    from fmaml.training.config import TrainConfig, resolve
    from fmaml.training.train import restore_state

    run, _, _ = train_small_omniglot(tmp_path, "--model", "resnet12")  # --hidden 4
    state = restore_state(run / "latest.pt")
    assert state.config.model == "resnet12"
    widths = [state.params[f"body.block{i}.conv1.weight"].shape[0] for i in range(4)]
    assert widths == [4, 10, 20, 40]
    result = invoke("test", "--checkpoint", run / "latest.pt", "--episodes", "4", "--json")
    assert result.exit_code == 0, result.output
    assert resolve(TrainConfig(dataset="omniglot", model="resnet12")).hidden == 64
    refused = invoke("train", "--model", "resnet12", "--max-pool", "--iterations", "1")
    assert refused.exit_code == 1 and "ResNet-12 always max-pools" in refused.output
    with pytest.raises(ValueError, match=r"--model must be one of \['conv4', 'resnet12'\]"):
        resolve(TrainConfig(dataset="omniglot", model="vgg"))
    with pytest.raises(ValueError, match="the sinusoid uses an MLP"):
        resolve(TrainConfig(dataset="sinusoid", model="resnet12"))


def test_a_preset_gives_its_settings_and_the_options_beside_it_win(tmp_path, isolated_cache):
    from fmaml.training.presets import PRESETS
    from fmaml.training.train import restore_state

    run, _, trained = train_small_omniglot(tmp_path, "--preset", "omniglot-unseen")
    preset = PRESETS["omniglot-unseen"]
    assert f"preset omniglot-unseen: {preset.summary}" in trained.output
    config = restore_state(run / "latest.pt").config
    assert config.preset == "omniglot-unseen"
    given = {"ways": 2, "meta_batch": 2, "hidden": 4}  # train_small_omniglot's options
    for name, value in preset.settings.items():
        assert getattr(config, name) == given.get(name, value), name
    assert config.iterations == 5, "--iterations beside the preset"
    assert "max-pool" in preset.summary and config.max_pool is True
    assert "replaced by the options given: ways=2, meta_batch=2" in trained.output
    assert config.loss_reduction == "mean" and config.eval_inner_steps == 10


def test_an_unknown_preset_is_refused_with_the_known_ones():
    from fmaml.training.presets import get_preset, with_preset

    result = invoke("train", "--preset", "nope")
    assert result.exit_code == 2 and "omniglot-unseen" in result.output
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; known presets: \['omniglot"):
        get_preset("nope")
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['wayz'\]"):
        with_preset("omniglot-unseen", wayz=3)


def test_train_logs_plain_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    import fmaml.training.cli

    args = ["train", "--dataset", "sinusoid", "--meta-batch", "4", "--hidden", "8", *FAST]
    result = invoke(*args, "--iterations", "12", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("iteration ")]
    assert lines[0].startswith("iteration 1/12: loss ") and "first step done" in lines[0]
    assert lines[-1].startswith("iteration 12/12: loss ") and " it/s (" in lines[-1]
    assert "validation mse " in lines[-1] and "(iteration 10)" not in lines[-1]
    assert len(lines) == 2, "15 s apart at most, and this run is shorter"
    done = result.output.splitlines()[-1]
    assert done.startswith("done: 12 iterations; the final model latest.pt (iteration 12)")
    assert "nan" not in done
    kept = invoke(*args, "--iterations", "12", "--keep-best", "--out", tmp_path / "kept")
    done = kept.output.splitlines()[-1]
    assert done.startswith("done: 12 iterations; best validation mse ") and "nan" not in done
    assert re.search(r"at iteration (5|10|12) \(best\.pt; latest\.pt is iteration 12\)", done)
    monkeypatch.setattr(fmaml.training.cli, "LOG_EVERY_S", 0.0)
    result = invoke(*args, "--iterations", "6", "--out", tmp_path / "b")
    lines = [line for line in result.output.splitlines() if line.startswith("iteration ")]
    assert [line.split(":")[0] for line in lines] == [f"iteration {i}/6" for i in range(1, 7)]
    assert "validation mse" in lines[4] and "validation mse" not in lines[3]


def test_train_shows_a_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    import fmaml.training.cli

    monkeypatch.setattr(fmaml.training.cli, "_stderr_is_terminal", lambda: True)
    args = ["train", "--dataset", "sinusoid", "--meta-batch", "4", "--hidden", "8", *FAST]
    result = invoke(*args, "--iterations", "6", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "meta-training" in result.output and "iteration 1/6" not in result.output


@pytest.mark.slow
def test_train_redirected_to_a_file_writes_progress_lines(tmp_path):
    """A real process, its output redirected: ``train ... > log 2>&1``."""
    log = tmp_path / "log"
    with open(log, "w") as out:
        subprocess.run(
            [
                sys.executable,
                "cli.py",
                "train",
                "--dataset",
                "sinusoid",
                "--iterations",
                "30",
                "--meta-batch",
                "4",
                "--hidden",
                "8",
                "--out",
                str(tmp_path / "run"),
                *FAST,
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    text = log.read_text()
    assert "iteration 1/30: loss " in text and "iteration 30/30: loss " in text
    assert text.splitlines()[-1].startswith("done: 30 iterations; the final model latest.pt")


def test_plot_labels_say_what_each_curve_is(tmp_path):
    from fmaml.training.plot import curve_labels, run_settings

    run = tmp_path / "run"
    args = ["train", "--dataset", "sinusoid", "--meta-batch", "4", "--hidden", "8", *FAST]
    assert invoke(*args, "--iterations", "5", "--out", run).exit_code == 0
    labels = curve_labels(run_settings(run), "mse")
    assert labels["title"] == "maml, sinusoid K=10"
    assert labels["train"].startswith("training: query mse after 1 inner step (")
    assert labels["val"] == "validation: mse after 10 inner steps, 4 fixed tasks, ± 95% CI"
    assert run_settings(tmp_path) is None and "inner step" not in curve_labels(None, "mse")["val"]


def write_metrics(run: Path, score: str, *, loss_is_score: bool) -> None:
    """A metrics.jsonl of 300 noisy training rows that fill the plot's area, and validation
    rows every 10 iterations, rising (accuracy) or falling (mse) steeply in the last third."""
    import math
    import random

    draw = random.Random(0)
    rows = []
    for it in range(1, 301):
        value = draw.uniform(0.2, 0.9) if score == "accuracy" else draw.uniform(0.01, 5.0)
        loss = value if loss_is_score else draw.uniform(0.5, 2.0)
        rows.append({"iteration": it, "split": "train", "loss": loss, score: value})
        if it % 10 == 0:
            rise = max(0.0, (it - 200) / 100)
            val = 0.3 + 0.6 * rise if score == "accuracy" else 4.0 * math.exp(-5 * rise)
            rows.append({"iteration": it, "split": "val", "score": val, "ci95": 0.02})
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize(
    ("score", "loss_is_score", "panels"),
    [("mse", True, 1), ("accuracy", False, 2)],
    ids=["sinusoid", "classification"],
)
def test_plot_keeps_legends_off_the_points_and_draws_each_panel_once(
    tmp_path, score, loss_is_score, panels
):
    from fmaml.training.plot import plot_run, run_figure

    run = tmp_path / "run"
    write_metrics(run, score, loss_is_score=loss_is_score)
    fig = run_figure(run)
    assert len(fig.axes) == panels  # sinusoid: the meta-loss is the MSE, shown once
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        assert not box.overlaps(ax.get_window_extent(renderer)), "the legend is on the axes"
        for line in ax.get_lines():
            for x, y in ax.transData.transform(line.get_xydata()):
                assert not box.contains(x, y), f"{line.get_label()!r} point under the legend"
    assert plot_run(run).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["test", "--checkpoint", "missing.pt"], "does not exist. Pass a checkpoint file"),
        (["train", "--dataset", "folder"], "--data-root is required for --dataset folder"),
        (
            ["train", "--dataset", "sinusoid", "--meta-batch", "0"],
            "--meta-batch must be a positive",
        ),
        (["train", "--data-root", "no/such/folder", "--no-download"], "no/such/folder"),
        (
            ["train", "--dataset", "sinusoid", "--chunk-size", "some"],
            "--chunk-size must be 'all' or a positive number of tasks, got 'some'",
        ),
        (
            ["train", "--dataset", "sinusoid", "--workers", "0"],
            "`workers` must be an integer of at least 1",
        ),
        (
            ["train", "--dataset", "sinusoid", "--within-alphabet"],
            "--within-alphabet draws each task's classes from one Omniglot alphabet; "
            "--dataset sinusoid has no alphabets",
        ),
    ],
)
def test_errors_are_one_clear_line(tmp_path, args, message):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_too_many_shots_for_the_data(tmp_path, isolated_cache):
    make_folder(tmp_path / "images", {f"c{i}": 3 for i in range(6)})
    result = invoke(
        "train",
        "--dataset",
        "folder",
        "--data-root",
        tmp_path / "images",
        "--split",
        "0.5,0,0.5",
        "--ways",
        "2",
        "--shots",
        "5",
        "--out",
        tmp_path / "r",
    )
    assert result.exit_code == 1
    assert "num_shots + num_query" in result.output and "Traceback" not in result.output


def test_help_shows_paper_defaults():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    assert "omniglot      5-way" in result.output and "inner_lr=0.4" in result.output
    assert "miniimagenet  5-way" in result.output and "grad_clip=10.0" in result.output


def test_real_process_help():
    done = subprocess.run(
        [sys.executable, "cli.py", "test", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--checkpoint" in done.stdout and "--json" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not OMNIGLOT_SUBSET.is_dir(), reason="shared Omniglot subset not present")
def test_real_omniglot_learns_above_chance(tmp_path):
    """Real data, real process: 60 MAML steps on 6 alphabets beat chance on the other 2.

    One test-time step, as trained: this early the paper's 3 test steps overshoot.
    """
    run = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            "cli.py",
            "train",
            "--data-root",
            str(OMNIGLOT_SUBSET),
            "--iterations",
            "60",
            "--meta-batch",
            "16",
            "--out",
            str(run),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        [
            sys.executable,
            "cli.py",
            "test",
            "--checkpoint",
            str(run),
            "--episodes",
            "100",
            "--query",
            "15",
            "--inner-steps",
            "1",
            "--json",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    report = last_json(done.stdout)
    assert report["episodes"] == 100 and report["inner_steps"] == 1
    assert report["accuracy"] - report["ci95"] > 30.0, report


def test_every_config_field_is_a_train_option_built_from_its_metadata():
    """CLI options come from TrainConfig's fields: a new setting is one field."""
    import dataclasses

    from fmaml.training.cli import train
    from fmaml.training.config import TrainConfig

    options = {p.name: p for p in train.params}
    fields = [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]
    assert {f.name for f in fields} <= set(options)
    for spec in fields:
        assert spec.metadata["help"] and options[spec.name].help == spec.metadata["help"]
    assert options["max_pool"].opts == ["--max-pool"] and options["max_pool"].secondary_opts == [
        "--stride"
    ]
    assert options["dataset"].default == "omniglot", "the command line's own default"
    assert options["within_alphabet"].is_flag and options["keep_best"].default is None
    assert {"strategy", "extra"}.isdisjoint(options), "set by --chunk-size etc., not directly"
    assert set(options) - {f.name for f in fields} == {
        "download",
        "checksum",
        "chunk_size",
        "workers",
        "recompute_steps",
        "compile_step",
        "out",
        "resume",
    }


def test_a_field_only_on_the_command_line_reaches_the_config(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--dataset", "sinusoid", "--meta-batch", "2", "--hidden", "4"]
    result = invoke(*args, "--iterations", "2", "--log-every", "1", "--out", run, *FAST)
    assert result.exit_code == 0, result.output
    rows = [json.loads(row) for row in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["split"] == "train"] == [1, 2], "--log-every 1"
    result = invoke(*args, "--loss-reduction", "median", "--iterations", "1")
    assert result.exit_code == 2 and "'median' is not one of 'sum_per_shot', 'mean'" in (
        result.output
    )
