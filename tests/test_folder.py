"""A user's own folder of class images: formats, sizes, channels, splits and bad data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest_images import isolated_cache, make_folder
from PIL import Image

from fmaml.tasks.datasets import load_splits
from fmaml.tasks.folder import load_folder
from fmaml.tasks.images import DataError, EpisodeSampler

_ = isolated_cache


@pytest.fixture(autouse=True)
def _cache_in_tmp(isolated_cache):
    return isolated_cache


def test_mixed_formats_and_sizes(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    Image.new("RGB", (50, 20), (200, 10, 10)).save(tmp_path / "cats" / "a.jpg", quality=95)
    Image.new("RGBA", (7, 9), (200, 10, 10, 255)).save(tmp_path / "cats" / "b.PNG")
    Image.new("L", (33, 33), 128).save(tmp_path / "cats" / "c.bmp")
    Image.new("RGB", (12, 12), (10, 200, 10)).save(tmp_path / "dogs" / "d.webp", lossless=True)
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.save(tmp_path / "dogs" / "e.gif", transparency=0)
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "dogs" / "f.jpeg", quality=95)
    data = load_folder(tmp_path, image_size=16)
    assert data.class_names == ("cats", "dogs")
    assert data.images.shape == (6, 3, 16, 16)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    centre = data.images[:, :, 8, 8].int()
    assert torch.allclose(centre[:2], torch.tensor([200, 10, 10], dtype=torch.int32), atol=4)
    assert centre[2].tolist() == [128, 128, 128]
    assert torch.allclose(centre[3:], torch.tensor([10, 200, 10], dtype=torch.int32), atol=4)
    grey = load_folder(tmp_path, image_size=5, channels=1)
    assert grey.images.shape == (6, 1, 5, 5)


def test_ignores_hidden_and_non_image_files(tmp_path):
    make_folder(tmp_path, {"a": 2, "b": 3})
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / ".thumbnails").mkdir()
    (tmp_path / "README.md").write_text("hello")
    data = load_folder(tmp_path, image_size=4)
    assert data.class_names == ("a", "b")
    assert data.class_sizes().tolist() == [2, 3]


def test_split_by_class_with_proportions_and_seed(tmp_path):
    make_folder(tmp_path, {f"class{i:02d}": 3 for i in range(20)})
    parts = load_splits("folder", tmp_path, split="0.5,0.25,0.25", image_size=6, seed=4)
    names = {k: set(v.class_names) for k, v in parts.items()}
    assert {k: len(v) for k, v in names.items()} == {"train": 10, "val": 5, "test": 5}
    assert not names["train"] & names["test"] and not names["val"] & names["test"]
    assert not names["train"] & names["val"]
    again = load_splits("folder", tmp_path, split="0.5,0.25,0.25", image_size=6, seed=4)
    other = load_splits("folder", tmp_path, split="0.5,0.25,0.25", image_size=6, seed=5)
    assert again["val"].class_names == parts["val"].class_names
    assert other["val"].class_names != parts["val"].class_names
    no_val = load_splits("folder", tmp_path, split="0.8,0,0.2", image_size=6)
    assert sorted(no_val) == ["test", "train"]
    task = EpisodeSampler(parts["train"], 5, 1, 2).sample(3, torch.Generator().manual_seed(0))
    assert task.query[0].shape == (3, 10, 3, 6, 6)


def test_bad_arguments(tmp_path):
    make_folder(tmp_path, {"a": 1})
    with pytest.raises(ValueError, match=r"`channels` must be 1 \(grey\) or 3 \(RGB\), got 4"):
        load_folder(tmp_path, channels=4)
    with pytest.raises(ValueError, match=r"`image_size` must be a positive int, got 0"):
        load_folder(tmp_path, image_size=0)


def test_missing_root(tmp_path):
    with pytest.raises(
        DataError,
        match=r"'.*nope' does not exist\. Pass the folder that holds "
        r"one sub-folder per class",
    ):
        load_folder(tmp_path / "nope")


def test_root_without_class_folders(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match=r"holds no class folders\. Put each class's images"):
        load_folder(tmp_path)


def test_class_folder_without_images(tmp_path):
    make_folder(tmp_path, {"a": 2})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "list.csv").write_text("x")
    with pytest.raises(DataError, match=r"class folder '.*empty' holds no images"):
        load_folder(tmp_path)


def test_unreadable_image_is_named(tmp_path):
    make_folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match=r"could not read the image '.*b/broken\.jpg'"):
        load_folder(tmp_path)


def test_class_too_small_for_the_episode(tmp_path):
    make_folder(tmp_path, {"a": 5, "b": 2, "c": 5})
    data = load_folder(tmp_path, image_size=4)
    with pytest.raises(DataError, match=r"1 of 3 classes have fewer \(e\.g\. 'b' has 2\)"):
        EpisodeSampler(data, num_ways=3, num_shots=1, num_query=2)


def test_values_round_trip_exactly_for_images_already_at_size(tmp_path):
    (tmp_path / "a").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a" / "x.png")
    Image.fromarray(pixels).save(tmp_path / "a" / "y.png")
    data = load_folder(tmp_path, image_size=6)
    assert torch.equal(data.images[0], torch.from_numpy(pixels).permute(2, 0, 1))
    task = EpisodeSampler(data, 1, 1, 1).sample(1, torch.Generator())
    assert torch.allclose(task.support[0][0, 0], data.images[0].float() / 255)
