"""``train`` then ``test`` on each published benchmark, from generated files in its layout."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from conftest_datasets import make_cifar100, make_cub, make_tiered
from conftest_images import snapshot

from fmaml.training.cli import main

TINY = [
    "--ways", "2", "--shots", "1", "--query", "1", "--meta-batch", "2", "--image-size", "8",
    "--hidden", "4", "--iterations", "2", "--val-every", "2", "--val-episodes", "2",
    "--inner-steps", "1", "--eval-inner-steps", "1",
    "--checkpoint-every", "2", "--no-download",
]  # fmt: skip


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def make(dataset: str, root) -> None:
    if dataset in ("cifarfs", "fc100"):
        make_cifar100(root)
    elif dataset == "tieredimagenet":
        make_tiered(root, sizes={"train": (2, 4), "val": (1, 2), "test": (2, 3)}, per_class=2)
    else:
        make_cub(root)


@pytest.mark.parametrize(
    ("dataset", "classes"),
    [
        ("cifarfs", r"classes: train 64 \(20 groups\), val 16 \(.*\), test 20 \("),
        ("fc100", r"classes: train 60 \(12 groups\), val 20 \(4 groups\), test 20 \(4 groups\)"),
        ("tieredimagenet", r"classes: train 4 \(n9train00000, n9train00001\), val 2 \("),
        ("cub", r"classes: train 100, val 50, test 50"),
    ],
)
def test_train_and_test_on_a_published_layout(tmp_path, isolated_cache, dataset, classes):
    root, run = tmp_path / "data", tmp_path / "run"
    make(dataset, root)
    before = snapshot(root)
    args = ["train", "--dataset", dataset, "--data-root", root, "--out", run, "--no-checksum"]
    result = invoke(*args, *TINY)
    assert result.exit_code == 0, result.output
    assert re.search(classes, result.output), result.output
    result = invoke("test", "--checkpoint", run, "--episodes", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["episodes"] == 4 and 0 <= report["accuracy"] <= 100
    assert snapshot(root) == before


def test_the_checksum_is_checked_unless_told_not_to(tmp_path, isolated_cache):
    make_cifar100(tmp_path / "data")
    args = ["train", "--dataset", "cifarfs", "--data-root", tmp_path / "data", *TINY]
    result = invoke(*args, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "expected md5 16019d7e3df5f24257cddd939b257f8d" in result.output
    assert "--no-checksum" in result.output


def test_help_lists_the_benchmarks_defaults():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    for dataset in ("cifarfs", "fc100", "tieredimagenet", "cub"):
        assert f"{dataset:<13} 5-way" in result.output
    assert "image_size=32" in result.output and "--no-checksum" in result.output
