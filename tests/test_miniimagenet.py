"""mini-ImageNet in both layouts (CSV + JPEGs, and the pickles), on tiny generated data."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest_images import isolated_cache, snapshot
from PIL import Image

import fmaml.tasks.images as images_module
from fmaml.tasks.datasets import load_splits
from fmaml.tasks.images import DataError, EpisodeSampler
from fmaml.tasks.miniimagenet import load_miniimagenet, load_miniimagenet_splits

_ = isolated_cache


@pytest.fixture(autouse=True)
def _cache_in_tmp(isolated_cache):
    return isolated_cache


CLASSES = {
    "train": ["n01532829", "n01558993", "n01704323"],
    "val": ["n01855672", "n02091244"],
    "test": ["n01930112", "n01981276"],
}


def colour(label: str) -> tuple[int, int, int]:
    seed = int(label[1:]) % 997
    return (seed % 200 + 20, (seed * 7) % 200 + 20, (seed * 13) % 200 + 20)


def write_csv_layout(root, per_class: int = 4, size=(30, 40)) -> None:
    """``root/images/<label><NNNN>.jpg`` (a solid colour per class) and the three CSVs."""
    (root / "images").mkdir(parents=True)
    for split, labels in CLASSES.items():
        lines = ["filename,label"]
        for label in labels:
            for i in range(per_class):
                name = f"{label}{i:08d}.jpg"
                Image.new("RGB", size, colour(label)).save(root / "images" / name, quality=95)
                lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def write_pickle_layout(root, per_class: int = 3, side: int = 84) -> dict[str, np.ndarray]:
    """``root/mini-imagenet-cache-<split>.pkl`` with shuffled rows; returns image_data."""
    root.mkdir(parents=True, exist_ok=True)
    stored = {}
    rng = np.random.default_rng(0)
    for split, labels in CLASSES.items():
        n = per_class * len(labels)
        image_data = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        rows = rng.permutation(n)
        class_dict = {
            label: rows[k * per_class : (k + 1) * per_class].tolist()
            for k, label in enumerate(labels[::-1])  # not sorted: the loader sorts
        }
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as stream:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, stream)
        stored[split] = (image_data, class_dict)
    return stored


def test_csv_layout(tmp_path):
    write_csv_layout(tmp_path)
    train = load_miniimagenet(tmp_path, "train")
    assert train.images.shape == (12, 3, 84, 84) and train.images.dtype == torch.uint8
    assert train.class_names == tuple(CLASSES["train"])
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for c, label in enumerate(CLASSES["train"]):
        pixel = train.images[train.labels == c][:, :, 42, 42].float()
        assert torch.allclose(pixel, torch.tensor(colour(label)).float().expand_as(pixel), atol=4)
    small = load_miniimagenet(tmp_path, "val", image_size=10)
    assert small.images.shape == (8, 3, 10, 10)


def test_csv_layout_is_decoded_once(tmp_path, monkeypatch, isolated_cache):
    write_csv_layout(tmp_path, per_class=2)
    before = snapshot(tmp_path)
    calls = []
    real = images_module.decode_image
    monkeypatch.setattr(images_module, "decode_image", lambda *a: calls.append(a[0]) or real(*a))
    first = load_miniimagenet_splits(tmp_path, image_size=16)
    assert len(calls) == 14
    second = load_miniimagenet_splits(tmp_path, image_size=16)
    assert len(calls) == 14
    assert all(torch.equal(first[k].images, second[k].images) for k in first)
    assert len(list(isolated_cache.glob("miniimagenet-*-16x16-RGB-*.npz"))) == 3
    assert snapshot(tmp_path) == before  # nothing written next to the data


def test_pickle_layout(tmp_path):
    stored = write_pickle_layout(tmp_path)
    test = load_miniimagenet(tmp_path, "test")
    image_data, class_dict = stored["test"]
    assert test.class_names == tuple(sorted(CLASSES["test"]))
    assert test.images.shape == (6, 3, 84, 84)
    for c, label in enumerate(test.class_names):
        want = torch.from_numpy(image_data[class_dict[label]]).permute(0, 3, 1, 2)
        assert torch.equal(test.images[test.labels == c], want)
    resized = load_miniimagenet(tmp_path, "test", image_size=21)
    assert resized.images.shape == (6, 3, 21, 21)


def test_load_splits_in_both_layouts(tmp_path):
    write_csv_layout(tmp_path / "csv", per_class=2)
    write_pickle_layout(tmp_path / "pkl", per_class=2)
    for root in (tmp_path / "csv", tmp_path / "pkl"):
        parts = load_splits("miniimagenet", root, image_size=12)
        assert {k: v.num_classes for k, v in parts.items()} == {"train": 3, "val": 2, "test": 2}
        task = EpisodeSampler(parts["train"], 3, 1, 1).sample(2, torch.Generator())
        assert task.support[0].shape == (2, 3, 3, 12, 12)


# ---------------------------------------------------------------------------- bad data


def test_missing_root(tmp_path):
    with pytest.raises(
        DataError,
        match=r"data folder '.*absent' does not exist\. Download "
        r"mini-ImageNet by hand",
    ):
        load_miniimagenet(tmp_path / "absent", "train")


def test_no_split_files(tmp_path):
    with pytest.raises(
        DataError,
        match=r"found neither train\.csv nor mini-imagenet-cache-"
        r"train\.pkl",
    ):
        load_miniimagenet(tmp_path, "train")


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match=r"`split` must be one of \('train', 'val', 'test'\)"):
        load_miniimagenet(tmp_path, "validation")


def test_csv_naming_a_missing_file(tmp_path):
    write_csv_layout(tmp_path, per_class=2)
    (tmp_path / "images" / "n0155899300000001.jpg").unlink()
    with pytest.raises(
        DataError,
        match=r"line 5 of '.*train\.csv' names "
        r"'n0155899300000001\.jpg', but .* does not exist",
    ):
        load_miniimagenet(tmp_path, "train")


def test_csv_with_a_wrong_header(tmp_path):
    write_csv_layout(tmp_path, per_class=1)
    (tmp_path / "val.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(
        DataError,
        match=r"should start with the header 'filename,label', found "
        r"\['file', 'class'\]",
    ):
        load_miniimagenet(tmp_path, "val")


def test_csv_with_a_bad_row(tmp_path):
    write_csv_layout(tmp_path, per_class=1)
    (tmp_path / "val.csv").write_text("filename,label\nn0185567200000000.jpg\n")
    with pytest.raises(DataError, match=r"line 2 of .* expected 'filename,label'"):
        load_miniimagenet(tmp_path, "val")


def test_empty_csv(tmp_path):
    write_csv_layout(tmp_path, per_class=1)
    (tmp_path / "test.csv").write_text("")
    with pytest.raises(DataError, match=r"found nothing \(empty file\)"):
        load_miniimagenet(tmp_path, "test")
    (tmp_path / "test.csv").write_text("filename,label\n")
    with pytest.raises(DataError, match=r"lists no images"):
        load_miniimagenet(tmp_path, "test")


def test_truncated_jpeg_is_named(tmp_path):
    write_csv_layout(tmp_path, per_class=2, size=(64, 64))
    victim = tmp_path / "images" / "n0193011200000001.jpg"
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(DataError, match=r"could not read the image '.*n0193011200000001\.jpg'"):
        load_miniimagenet(tmp_path, "test")


def test_pickle_without_the_expected_keys(tmp_path):
    with open(tmp_path / "mini-imagenet-cache-train.pkl", "wb") as stream:
        pickle.dump({"images": np.zeros((1, 84, 84, 3), np.uint8), "labels": [0]}, stream)
    with pytest.raises(
        DataError,
        match=r"should hold a dict with keys 'image_data' and "
        r"'class_dict', found \['images', 'labels'\]",
    ):
        load_miniimagenet(tmp_path, "train")


def test_pickle_that_is_not_a_dict(tmp_path):
    with open(tmp_path / "mini-imagenet-cache-train.pkl", "wb") as stream:
        pickle.dump([1, 2, 3], stream)
    with pytest.raises(DataError, match=r"found list"):
        load_miniimagenet(tmp_path, "train")


def test_truncated_pickle(tmp_path):
    write_pickle_layout(tmp_path)
    path = tmp_path / "mini-imagenet-cache-val.pkl"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"could not read '.*val\.pkl' .*download it again"):
        load_miniimagenet(tmp_path, "val")


@pytest.mark.parametrize(
    ("image_data", "class_dict", "match"),
    [
        (np.zeros((2, 84, 84), np.uint8), {"a": [0, 1]}, r"should be uint8 \[N, H, W, 3\]"),
        (np.zeros((2, 84, 84, 3), np.float32), {"a": [0, 1]}, r"found float32"),
        (np.zeros((2, 84, 84, 3), np.uint8), {"a": [0, 2]}, r"expected integers in 0\.\.1"),
        (np.zeros((2, 84, 84, 3), np.uint8), {"a": []}, r"class 'a' .* lists rows \[\]"),
        (np.zeros((2, 84, 84, 3), np.uint8), [0, 1], r"'class_dict' .* found list"),
    ],
)
def test_pickle_with_bad_contents(tmp_path, image_data, class_dict, match):
    with open(tmp_path / "mini-imagenet-cache-train.pkl", "wb") as stream:
        pickle.dump({"image_data": image_data, "class_dict": class_dict}, stream)
    with pytest.raises(DataError, match=match):
        load_miniimagenet(tmp_path, "train")


def test_too_few_images_per_class_for_the_episode(tmp_path):
    write_pickle_layout(tmp_path, per_class=3, side=8)
    data = load_miniimagenet(tmp_path, "train", image_size=8)
    with pytest.raises(
        DataError,
        match=r"num_shots \+ num_query = 1 \+ 15 = 16 images, but 3 "
        r"of 3 classes have fewer",
    ):
        EpisodeSampler(data, num_ways=3, num_shots=1, num_query=15)
    with pytest.raises(
        DataError,
        match=r"5-way tasks need at least 5 classes, but this split "
        r"has 3",
    ):
        EpisodeSampler(data, num_ways=5, num_shots=1, num_query=1)
