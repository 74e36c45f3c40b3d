"""Which errors the command line prints as one line, and which keep their traceback."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest_images import folder_train_args, isolated_cache, make_folder
from test_layout import import_cycles, package_imports

import fmaml.training.train as train_module
from fmaml.errors import ConfigError, FmamlError, InputError
from fmaml.training.checkpoint import CheckpointError
from fmaml.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
_ = isolated_cache


@pytest.fixture(autouse=True)
def _cache_in_tmp(isolated_cache):
    return isolated_cache


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture
def run_without_validation(tmp_path):
    make_folder(tmp_path / "images", {f"c{i}": 3 for i in range(6)})
    run = tmp_path / "run"
    args = folder_train_args(tmp_path / "images", "0.67,0,0.33")
    result = invoke(*args, "--iterations", "2", "--out", run)
    assert result.exit_code == 0, result.output
    return run


def test_testing_a_split_the_run_does_not_have_says_which_it_has(run_without_validation):
    result = invoke("test", "--checkpoint", run_without_validation, "--split", "val")
    assert result.exit_code == 1
    assert (
        "the data has no 'val' split: its classes were split into train, test "
        "(--split 0.67,0,0.33). Evaluate on --split test, or train with a --split that gives "
        "'val' a share"
    ) in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "0.5,0.5"], "expected three non-negative proportions 'train,val,test'"),
        (
            ["--split", "0,0.5,0.5"],
            "2-way tasks need at least 2 classes in every split they are drawn from (train, "
            "test, and val when --split gives it a share), but --split 0,0.5,0.5 of the data "
            "in ",
        ),
        (["--split", "0,0.5,0.5"], "gives train 0, val 3, test 3 classes: too few in train."),
        (["--split", "0,0.5,0.5"], "give train a larger share with --split."),
        (
            ["--download"],
            "--download fetches omniglot, cifarfs, fc100, cub only; folder can't be downloaded",
        ),
        (["--image-size", "0"], "--image-size must be a positive integer, got 0"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, args, message):
    make_folder(tmp_path / "images", {f"c{i}": 3 for i in range(6)})
    result = invoke(
        "train", "--dataset", "folder", "--data-root", tmp_path / "images", "--ways", "2",
        "--shots", "1", "--query", "1", "--out", tmp_path / "run", *args,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("classes", "args", "message"),
    [
        (  # one class: the split rule leaves test empty
            {"only": 4},
            [],
            "5-way tasks need at least 5 classes in every split they are drawn from (train, "
            "test, and val when --split gives it a share), but the default --split of the data "
            "in {root!r} gives train 1, val 0, test 0 classes: too few in train and test. Use "
            "data with more classes (at least 5 in each of train and test).",
        ),
        (  # no split empty, but too small for the tasks
            {f"c{i}": 3 for i in range(10)},
            ["--split", "0.4,0.3,0.3", "--ways", "4"],
            "gives train 4, val 3, test 3 classes: too few in val and test. Use data with more "
            "classes (at least 4 in each of train, val and test); or lower --ways to 3.",
        ),
    ],
    ids=["one-class", "small-splits"],
)
def test_too_few_classes_per_split_says_what_each_split_needs_and_has(
    tmp_path, classes, args, message
):
    root = tmp_path / "images"
    make_folder(root, classes)
    result = invoke("train", "--dataset", "folder", "--data-root", root, *args)
    assert result.exit_code == 1, result.output
    assert message.format(root=str(root)) in " ".join(result.output.split())
    assert "larger proportion" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [],
            "--data-root {root!r} does not exist; nothing was created. Point --data-root at the "
            "folder that holds Omniglot (<alphabet>/<character>/<image>.png, or the official "
            "images_background/ and images_evaluation/ from "
            "https://github.com/brendenlake/omniglot), or add --download to fetch the official "
            "archives into it.",
        ),
        (
            ["--no-download"],
            "the Omniglot folder {root!r} does not exist and --no-download was given; nothing "
            "was created. Put Omniglot there (<alphabet>/<character>/<image>.png, or the "
            "official images_background/ and images_evaluation/ from "
            "https://github.com/brendenlake/omniglot), point --data-root at the folder that "
            "holds it, or replace --no-download with --download to fetch it into that folder.",
        ),
    ],
    ids=["no-flag", "no-download"],
)
def test_a_missing_data_root_is_named_and_nothing_is_created(tmp_path, args, message):
    root = tmp_path / "does" / "not" / "exist"
    result = invoke("train", "--data-root", root, *args, "--out", tmp_path / "run")
    assert result.exit_code == 1, result.output
    assert message.format(root=str(root)) in " ".join(result.output.split())
    assert "Pass download=True" not in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # neither the data folder nor the run folder


def test_no_download_on_the_missing_default_folder_says_to_drop_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--no-download")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "the Omniglot folder 'data/omniglot' does not exist and --no-download was given" in (
        text
    )
    assert "or drop --no-download to fetch it there." in text
    assert list(tmp_path.iterdir()) == []


def test_plot_without_metrics_is_one_line(tmp_path):
    result = invoke("plot", tmp_path)
    assert result.exit_code == 1
    assert "no metrics.jsonl in" in result.output and "Traceback" not in result.output


def test_a_bug_in_fmaml_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(train_module, "meta_step", broken)
    result = invoke("train", "--dataset", "sinusoid", "--hidden", "4", "--out", tmp_path / "r")
    assert result.exit_code == 1
    assert isinstance(result.exception, ValueError)  # not turned into a one-line message
    assert not isinstance(result.exception, FmamlError)
    assert "an internal inconsistency" in str(result.exception)


@pytest.mark.slow
def test_a_bug_prints_a_traceback_from_a_real_process(tmp_path):
    """A ValueError that is not fmaml's input error reaches the terminal with its trace."""
    code = (
        "import sys, fmaml.training.train as t\n"
        "def broken(*a, **k): raise ValueError('an internal inconsistency')\n"
        "t.meta_step = broken\n"
        "from fmaml.training.cli import main\n"
        "sys.argv = ['fmaml', 'train', '--dataset', 'sinusoid', '--hidden', '4', '--out', "
        f"{str(tmp_path / 'r')!r}]\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: an internal inconsistency" in done.stderr


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback_of_user_errors_too(tmp_path, how):
    args = ["test", "--checkpoint", tmp_path / "missing.pt"]
    plain = invoke(*args)
    assert plain.exit_code == 1 and "does not exist" in plain.output
    assert isinstance(plain.exception, SystemExit)
    if how == "flag":
        result = invoke("--debug", *args)
    else:
        result = invoke(*args, env={"FMAML_DEBUG": "1"})
    assert result.exit_code == 1
    assert isinstance(result.exception, CheckpointError)
    assert invoke(*args, env={"FMAML_DEBUG": "0"}).exception.__class__ is SystemExit


def test_the_error_classes_keep_their_builtin_bases():
    """Code that catches ValueError keeps working: fmaml's input errors are ValueErrors."""
    assert issubclass(ConfigError, InputError) and issubclass(InputError, ValueError)
    assert issubclass(CheckpointError, InputError)


@pytest.mark.parametrize(
    ("module", "name", "new_home"),
    [
        ("fmaml.tasks.images", "load_splits", "fmaml.tasks.datasets.load_splits"),
        ("fmaml.tasks.images", "DATASETS", "fmaml.tasks.datasets.DATASETS"),
        ("fmaml.training.problems", "build_problem", "fmaml.training.train.build_problem"),
    ],
)
def test_moved_names_say_where_they_went(module, name, new_home):
    with pytest.raises(ImportError, match=rf"{module}\.{name} moved to {new_home}"):
        exec(f"from {module} import {name}", {})
    assert importlib.import_module(new_home.rsplit(".", 1)[0]) is not None


def test_no_two_modules_of_the_package_import_each_other():
    """Nor any longer loop of imports, in the sub-packages too (fmaml/engine, fmaml/training,
    fmaml/bench, ...); imports inside functions count, ``if TYPE_CHECKING:`` ones don't.
    tests/test_layout.py checks which way the imports point."""
    graph = package_imports()
    assert {"fmaml.engine.strategy", "fmaml.training.train", "fmaml.bench.harness"} <= set(graph)
    pairs = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, set()))
    assert pairs == []
    assert import_cycles(graph) == []
