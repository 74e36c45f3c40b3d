"""ClassImages, splits, decoding, the decode-once cache and the episode sampler."""

from __future__ import annotations

import doctest
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_images import coded_images, isolated_cache, make_folder, rows_of, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import fmaml.tasks.cache as cache_module
import fmaml.tasks.images as images_module
from fmaml.tasks.cache import cached_images
from fmaml.tasks.datasets import load_splits
from fmaml.tasks.folder import load_folder
from fmaml.tasks.images import (
    ClassImages,
    DataError,
    EmptySplitData,
    EpisodeSampler,
    EpisodeSpec,
    decode_image,
    decode_images,
    fixed_episodes,
    parse_fractions,
    split_classes,
    split_counts,
    split_groups,
)
from fmaml.types import Task

_ = isolated_cache  # a fixture, used by name below


@pytest.fixture(autouse=True)
def _cache_in_tmp(isolated_cache):
    return isolated_cache


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grouped(num_groups: int, per_group: int = 2) -> ClassImages:
    num_classes = num_groups * per_group
    return ClassImages(
        torch.zeros(num_classes * 2, 1, 2, 2, dtype=torch.uint8),
        torch.arange(num_classes).repeat_interleave(2),
        tuple(f"g{c // per_group}/c{c}" for c in range(num_classes)),
        tuple(f"g{c // per_group}" for c in range(num_classes)),
    )


def test_docstring_examples_run():
    result = doctest.testmod(images_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0


# ------------------------------------------------------------------------- ClassImages


def test_class_images_holds_what_it_was_given():
    data = coded_images([3, 5, 2])
    assert data.num_classes == 3
    assert len(data) == 10
    assert data.image_shape == (1, 4, 4)
    assert data.groups == (None, None, None)
    assert data.class_sizes().tolist() == [3, 5, 2]
    assert "num_classes=3" in repr(data)
    moved = data.to("cpu")
    assert moved is not data
    assert torch.equal(moved.images, data.images)


def test_class_images_is_immutable():
    data = coded_images([2, 2])
    with pytest.raises(AttributeError):
        data.labels = torch.zeros(4, dtype=torch.int64)  # type: ignore[misc]


def test_subset_relabels_in_the_order_given():
    data = coded_images([3, 5, 2])
    part = data.subset([2, 0])
    assert part.class_names == ("class2", "class0")
    assert part.class_sizes().tolist() == [2, 3]
    # every image kept is one of the original class's, under its new label
    for new, old in enumerate([2, 0]):
        kept = rows_of(part.images[part.labels == new].float() / 255)
        assert set(kept.tolist()) == set((data.labels == old).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    ("images", "labels", "names", "groups", "match"),
    [
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), ("a",), None, "uint8"),
        (
            torch.zeros(2, 2, 2, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            ("a",),
            None,
            r"uint8 tensor \[N, C, H, W\]",
        ),
        (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2), ("a",), None, "int64"),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.int64),
            ("a",),
            None,
            "2 images but 3 labels",
        ),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.tensor([0, 1]),
            ("a",),
            None,
            r"labels must lie in 0\.\.0",
        ),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
            torch.tensor([0, 1]),
            ("a", "b"),
            ("g",),
            "2 class names but 1 groups",
        ),
    ],
)
def test_class_images_rejects_inconsistent_fields(images, labels, names, groups, match):
    with pytest.raises(ValueError, match=match):
        ClassImages(images, labels, names, groups)


def test_subset_rejects_bad_ids():
    data = coded_images([2, 2])
    with pytest.raises(ValueError, match=r"subset\(\): class ids must lie in 0\.\.1, got \[5\]"):
        data.subset([0, 5])
    with pytest.raises(ValueError, match=r"must be distinct, got repeats in \[1\]"):
        data.subset([1, 1])


# ------------------------------------------------------------------------------ splits


@given(st.integers(0, 2000), st.lists(st.integers(0, 100), min_size=3, max_size=3))
@settings(max_examples=200, deadline=None)
def test_split_counts_sum_to_the_total_and_round_fairly(total, weights):
    if sum(weights) == 0:
        weights = [1, 0, 0]
    fractions = [w / sum(weights) for w in weights]
    counts = split_counts(total, fractions)
    assert sum(counts) == total
    assert all(abs(c - total * f) < 1 for c, f in zip(counts, fractions, strict=True))


def test_split_classes_is_disjoint_complete_and_deterministic():
    data = coded_images([2] * 20)
    first = split_classes(data, (0.7, 0.1, 0.2), generator(3))
    again = split_classes(data, (0.7, 0.1, 0.2), generator(3))
    other = split_classes(data, (0.7, 0.1, 0.2), generator(4))
    names = {k: set(v.class_names) for k, v in first.items()}
    assert {k: len(v) for k, v in names.items()} == {"train": 14, "val": 2, "test": 4}
    assert names["train"].isdisjoint(names["test"]) and names["val"].isdisjoint(names["test"])
    assert names["train"] | names["val"] | names["test"] == set(data.class_names)
    assert {k: v.class_names for k, v in again.items()} == {
        k: v.class_names for k, v in first.items()
    }
    assert other["test"].class_names != first["test"].class_names
    assert first["train"].labels.max() == 13  # relabelled 0..k-1


def test_split_classes_leaves_out_an_empty_val():
    parts = split_classes(coded_images([2] * 8), (0.75, 0.0, 0.25), generator())
    assert sorted(parts) == ["test", "train"]
    assert (parts["train"].num_classes, parts["test"].num_classes) == (6, 2)


def test_split_classes_refuses_an_empty_test_split():
    with pytest.raises(EmptySplitData, match=r"gives train 3, val 0, test 0 classes: the test"):
        split_classes(coded_images([2] * 3), (0.9, 0.0, 0.1), generator())
    with pytest.raises(EmptySplitData) as raised:
        split_classes(coded_images([2] * 3), (0.9, 0.0, 0.1), generator())
    assert raised.value.counts == {"train": 3, "val": 0, "test": 0}
    assert isinstance(pickle.loads(pickle.dumps(raised.value)), EmptySplitData)


def test_split_groups_keeps_groups_together():
    data = grouped(num_groups=8, per_group=3)
    parts = split_groups(data, (0.75, 0.0, 0.25), generator(1))
    groups = {k: set(v.groups) for k, v in parts.items()}
    assert sorted(parts) == ["test", "train"]
    assert (len(groups["train"]), len(groups["test"])) == (6, 2)
    assert groups["train"].isdisjoint(groups["test"])
    assert parts["train"].num_classes == 18 and parts["test"].num_classes == 6
    again = split_groups(data, (0.75, 0.0, 0.25), generator(1))
    assert again["test"].class_names == parts["test"].class_names


def test_split_groups_needs_groups():
    with pytest.raises(DataError, match=r"split_groups\(\): 2 classes have no group"):
        split_groups(coded_images([2, 2]), (0.5, 0, 0.5), generator())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0.5,0.5", "expected three non-negative proportions"),
        ("a,b,c", "expected three non-negative proportions"),
        ("0.5,-0.1,0.6", "expected three non-negative proportions"),
        ("0.5,0.5,0.5", r"sum to 1.5, not 1"),
    ],
)
def test_parse_fractions_rejects_bad_text(text, match):
    with pytest.raises(ValueError, match=match):
        parse_fractions(text)


# ---------------------------------------------------------------------------- decoding


def test_decode_image_converts_and_resizes(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (30, 10), (10, 20, 30, 128)).save(path)
    rgb = decode_image(path, 8, "RGB")
    grey = decode_image(path, 8, "L")
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[4, 4].tolist() == [10, 20, 30]
    assert grey.shape == (8, 8)


def test_decode_image_reads_palette_images_with_transparency_without_warning(tmp_path):
    path = tmp_path / "p.gif"
    image = Image.new("P", (6, 6), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.info["transparency"] = 0
    image.save(path, transparency=0)
    assert decode_image(path, 4, "RGB")[0, 0].tolist() == [200, 100, 50]


def test_decode_image_names_a_truncated_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"could not read the image '.*cut\.jpg'.*replace it"):
        decode_image(path, 8, "RGB")


def test_decode_image_names_a_file_that_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.png"):
        decode_image(path, 8, "L")


def test_decode_images_stacks_channels_first(tmp_path):
    files = make_folder(tmp_path, {"a": 2, "b": 1})
    assert decode_images(files, 5, "RGB").shape == (3, 3, 5, 5)
    assert decode_images(files, 5, "L").shape == (3, 1, 5, 5)
    assert decode_images([], 5, "L").shape == (0, 1, 5, 5)


# ------------------------------------------------------------------------------- cache


class CountingDecoder:
    def __init__(self):
        self.calls = 0
        self.real = images_module.decode_image

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def decoder(monkeypatch):
    counting = CountingDecoder()
    monkeypatch.setattr(images_module, "decode_image", counting)
    return counting


def test_second_load_reads_the_user_cache_and_leaves_the_data_alone(
    tmp_path, decoder, isolated_cache
):
    make_folder(tmp_path / "data", {"a": 3, "b": 2})
    before = snapshot(tmp_path / "data")
    first = load_folder(tmp_path / "data", image_size=8)
    assert decoder.calls == 5
    second = load_folder(tmp_path / "data", image_size=8)
    assert decoder.calls == 5  # nothing decoded the second time
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert len(list(isolated_cache.glob("folder-8x8-RGB-*.npz"))) == 1
    assert not list(isolated_cache.glob(".fmaml-tmp-*"))  # no temporary file left
    assert snapshot(tmp_path / "data") == before  # the writable data folder is untouched


def test_the_cache_follows_the_data_folders_path(tmp_path, decoder, isolated_cache):
    make_folder(tmp_path / "one", {"a": 2, "b": 2})
    make_folder(tmp_path / "two", {"a": 2, "b": 2})
    load_folder(tmp_path / "one", image_size=8)
    load_folder(tmp_path / "two", image_size=8)
    assert decoder.calls == 8  # same names, sizes and maybe times: still two sources
    assert len(list(isolated_cache.glob("folder-8x8-RGB-*.npz"))) == 2


def test_another_size_is_another_cache(tmp_path, decoder):
    make_folder(tmp_path, {"a": 2, "b": 2})
    load_folder(tmp_path, image_size=8)
    load_folder(tmp_path, image_size=6)
    assert decoder.calls == 8
    assert load_folder(tmp_path, image_size=8).image_shape == (3, 8, 8)
    assert load_folder(tmp_path, image_size=6).image_shape == (3, 6, 6)
    assert decoder.calls == 8


def test_changed_source_rebuilds_the_cache(tmp_path, decoder, isolated_cache):
    files = make_folder(tmp_path, {"a": 2, "b": 2})
    before = load_folder(tmp_path, image_size=8)
    Image.new("RGB", (12, 12), (255, 0, 0)).save(files[0])
    stat_before = files[0].stat()
    os.utime(files[0], ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 10**9))
    after = load_folder(tmp_path, image_size=8)
    assert decoder.calls == 8
    assert not torch.equal(before.images[0], after.images[0])
    assert after.images[0, :, 4, 4].tolist() == [255, 0, 0]
    # the stale cache of the same source and size was replaced, not kept beside the new one
    assert len(list(isolated_cache.glob("folder-8x8-RGB-*.npz"))) == 1


def test_a_same_size_edit_rebuilds_the_cache(tmp_path, decoder):
    files = make_folder(tmp_path, {"a": 2, "b": 2}, extension=".bmp", shape=(6, 6))
    load_folder(tmp_path, image_size=6)
    size = files[3].stat().st_size
    Image.new("RGB", (6, 6), (1, 2, 3)).save(files[3])  # BMP: same byte count, new pixels
    assert files[3].stat().st_size == size
    info = files[3].stat()
    os.utime(files[3], ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    assert load_folder(tmp_path, image_size=6).images[3, :, 0, 0].tolist() == [1, 2, 3]
    assert decoder.calls == 8


def test_an_added_image_rebuilds_the_cache(tmp_path, decoder):
    make_folder(tmp_path, {"a": 2, "b": 2})
    load_folder(tmp_path, image_size=8)
    Image.new("RGB", (5, 5)).save(tmp_path / "b" / "extra.png")
    assert load_folder(tmp_path, image_size=8).class_sizes().tolist() == [2, 3]
    assert decoder.calls == 9


def test_read_only_data_is_cached_in_the_user_cache(tmp_path, decoder, isolated_cache):
    make_folder(tmp_path / "data", {"a": 2, "b": 2})
    (tmp_path / "data").chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        before = snapshot(tmp_path / "data")
        load_folder(tmp_path / "data", image_size=8)
        load_folder(tmp_path / "data", image_size=8)
        assert snapshot(tmp_path / "data") == before
    finally:
        (tmp_path / "data").chmod(0o755)
    assert decoder.calls == 4
    assert len(list(isolated_cache.glob("folder-8x8-RGB-*.npz"))) == 1


def test_a_corrupt_cache_is_rebuilt(tmp_path, decoder, isolated_cache):
    make_folder(tmp_path, {"a": 2, "b": 2})
    load_folder(tmp_path, image_size=8)
    (cached,) = isolated_cache.glob("folder-*.npz")
    cached.write_bytes(b"not a zip")
    assert load_folder(tmp_path, image_size=8).image_shape == (3, 8, 8)
    assert decoder.calls == 8
    with np.load(cached) as stored:
        assert stored["images"].shape == (4, 3, 8, 8)


def test_cache_false_writes_nothing(tmp_path, decoder, isolated_cache):
    make_folder(tmp_path, {"a": 2, "b": 2})
    before = snapshot(tmp_path)
    load_folder(tmp_path, image_size=8, cache=False)
    load_folder(tmp_path, image_size=8, cache=False)
    assert decoder.calls == 8
    assert snapshot(tmp_path) == before and not list(isolated_cache.iterdir())


def test_an_unwritable_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FMAML_CACHE", str(blocker / "cache"))
    source = tmp_path / "data"
    source.mkdir()
    (source / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match=r"could not write the image cache.*Set FMAML_CACHE"):
        cached_images(
            "demo", source, [source / "x.bin"], "s", lambda: np.zeros((1, 1, 1, 1), np.uint8)
        )
    assert [p.name for p in source.iterdir()] == ["x.bin"]  # nothing fell back into the data


_BUILDER = """
import sys, time
import numpy as np
from fmaml.tasks.cache import cached_images

source, barrier = sys.argv[1], sys.argv[2]
def build():
    open(f"{barrier}.{sys.argv[3]}", "w").close()
    deadline = time.time() + 20
    while len(__import__("glob").glob(f"{barrier}.*")) < 2 and time.time() < deadline:
        time.sleep(0.01)  # both processes are building now
    return np.full((1, 1, 64, 64), 7, np.uint8)

images = cached_images("race", source, [f"{source}/x.bin"], "s", build)
print(int(images.sum()))
"""


@pytest.mark.slow
def test_two_processes_building_the_same_cache_both_end_with_a_valid_file(tmp_path, isolated_cache):
    source = tmp_path / "data"
    source.mkdir()
    (source / "x.bin").write_bytes(b"1")
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILDER, str(source), str(tmp_path / "building"), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(64 * 64 * 7)] * 2
    (cached,) = isolated_cache.glob("race-*.npz")  # one file, whole, and no temporary left
    assert not list(isolated_cache.glob(".fmaml-tmp-*"))
    with np.load(cached, allow_pickle=False) as stored:
        assert stored["images"].shape == (1, 1, 64, 64)
    built = []
    again = cached_images("race", source, [source / "x.bin"], "s", lambda: built.append(1))
    assert not built and int(again.sum()) == 64 * 64 * 7  # read back, not rebuilt


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FMAML_CACHE", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_module.cache_dir() == tmp_path
    monkeypatch.delenv("FMAML_CACHE")
    assert cache_module.cache_dir() == tmp_path / "xdg" / "fmaml"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert cache_module.cache_dir().parts[-2:] == (".cache", "fmaml")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_module.cache_dir() == Path.home() / ".cache" / "fmaml"


def test_source_key_names_a_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"source_key\(\): can't read '.*gone\.png'"):
        cache_module.source_key(tmp_path, [tmp_path / "gone.png"], "s")


# ----------------------------------------------------------------------------- sampler


def test_sample_shapes_dtypes_and_labels():
    data = coded_images([6] * 7)
    sampler = EpisodeSampler(data, num_ways=5, num_shots=2, num_query=3)
    task = sampler.sample(4, generator())
    assert isinstance(task, Task)
    (xs, ys), (xq, yq) = task
    assert xs.shape == (4, 10, 1, 4, 4) and xq.shape == (4, 15, 1, 4, 4)
    assert xs.dtype == torch.float32 and ys.dtype == torch.int64
    assert 0.0 <= float(xs.min()) and float(xs.max()) <= 1.0
    assert ys.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]] * 4
    assert yq.tolist() == [[j for j in range(5) for _ in range(3)]] * 4


def test_tasks_use_distinct_classes_and_disjoint_support_and_query():
    sizes = [5, 9, 20, 6, 5, 12, 7]  # uneven classes
    data = coded_images(sizes)
    sampler = EpisodeSampler(data, num_ways=4, num_shots=2, num_query=3)
    spec = sampler.describe(300, generator(1))
    task = sampler.gather(spec)
    support_rows, query_rows = rows_of(task.support[0]), rows_of(task.query[0])
    labels_of_rows = data.labels
    for t in range(spec.num_tasks):
        classes = spec.classes[t]
        assert len(set(classes.tolist())) == 4
        assert set(support_rows[t].tolist()).isdisjoint(query_rows[t].tolist())
        assert len(set(support_rows[t].tolist() + query_rows[t].tolist())) == 4 * 5
        # every image is of the class its label names
        assert torch.equal(labels_of_rows[support_rows[t]], classes[task.support[1][t]])
        assert torch.equal(labels_of_rows[query_rows[t]], classes[task.query[1][t]])
    assert torch.equal(spec.indices.flatten().sort().values.unique(), torch.arange(len(data)))


def test_every_image_of_a_small_class_gets_drawn_and_padding_never_is():
    data = coded_images([5, 40])  # class 0 is padded to 40 slots in the table
    sampler = EpisodeSampler(data, num_ways=2, num_shots=1, num_query=4)
    spec = sampler.describe(200, generator(2))
    rows = spec.indices[spec.classes == 0]  # [n, 5] rows of class 0
    class0 = set((data.labels == 0).nonzero().flatten().tolist())
    assert set(rows.flatten().tolist()) == class0


def test_label_order_is_random_per_task():
    data = coded_images([4] * 5)
    sampler = EpisodeSampler(data, num_ways=5, num_shots=1, num_query=1)
    spec = sampler.describe(2000, generator(5))
    # each class lands on each label about equally often
    counts = torch.zeros(5, 5)
    for label in range(5):
        counts[:, label] = torch.bincount(spec.classes[:, label], minlength=5).float()
    assert counts.min() > 320 and counts.max() < 480  # expected 400 each


def test_describe_depends_only_on_the_generator():
    sampler = EpisodeSampler(coded_images([6] * 10), 3, 2, 2, rotate=True)
    a = sampler.describe(16, generator(7))
    torch.rand(10)  # the global RNG moves; the spec must not care
    b = sampler.describe(16, generator(7))
    c = sampler.describe(16, generator(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.indices, c.indices)


def test_a_slice_of_a_spec_gathers_the_same_tasks():
    sampler = EpisodeSampler(coded_images([8] * 10, side=6), 5, 1, 2, rotate=True)
    spec = sampler.describe(8, generator(9))
    whole = sampler.gather(spec)
    for start, stop in [(0, 3), (3, 8), (5, None)]:
        part = sampler.gather(spec.slice(start, stop))
        for got, want in zip(part, whole, strict=True):
            assert torch.equal(got[0], want[0][start:stop])
            assert torch.equal(got[1], want[1][start:stop])
    shards = [sampler.gather(spec.shard(rank, 4)) for rank in range(4)]
    assert torch.equal(torch.cat([s.query[0] for s in shards]), whole.query[0])
    with pytest.raises(ValueError, match=r"8 tasks don't divide among 3 ranks"):
        spec.shard(0, 3)
    with pytest.raises(ValueError, match=r"need 0 <= rank < world_size, got rank=4"):
        spec.shard(4, 4)


def test_rotations_turn_every_image_of_a_class_by_the_drawn_quarter_turns():
    data = coded_images([6] * 6, side=5, channels=2)
    plain = EpisodeSampler(data, 3, 2, 1)
    turning = EpisodeSampler(data, 3, 2, 1, rotate=True)
    spec = turning.describe(64, generator(11))
    assert set(spec.rotations.unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(
        plain.describe(4, generator()).rotations, torch.zeros(4, 3, dtype=torch.int64)
    )
    turned = turning.gather(spec)
    upright = plain.gather(spec)
    for t in range(spec.num_tasks):
        for j in range(3):
            k = int(spec.rotations[t, j])
            want = torch.rot90(upright.support[0][t, 2 * j : 2 * j + 2], k, dims=(-2, -1))
            assert torch.equal(turned.support[0][t, 2 * j : 2 * j + 2], want)
            want = torch.rot90(upright.query[0][t, j], k, dims=(-2, -1))
            assert torch.equal(turned.query[0][t, j], want)


def test_fixed_episodes_repeat_with_the_seed():
    sampler = EpisodeSampler(coded_images([5] * 8), 4, 1, 3, rotate=True)
    a = fixed_episodes(sampler, 50, seed=3)
    torch.rand(5)
    b = fixed_episodes(sampler, 50, seed=3)
    c = fixed_episodes(sampler, 50, seed=4)
    assert isinstance(a, EpisodeSpec) and a.num_tasks == 50
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.classes, c.classes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_pixel_scaling_is_the_same_by_division_and_by_table(dtype):
    # gather divides by 255 on the CPU and looks values up elsewhere: both must agree exactly
    sampler = EpisodeSampler(coded_images([3] * 3), 2, 1, 1, dtype=dtype)
    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(values.to(dtype) / 255.0, sampler._to_unit[values.int()])
    assert float(sampler._to_unit[255]) == 1.0 and float(sampler._to_unit[0]) == 0.0


def test_gather_float64():
    sampler = EpisodeSampler(coded_images([3] * 3), 2, 1, 1, dtype=torch.float64)
    assert sampler.sample(2, generator()).support[0].dtype == torch.float64


def in_groups(sizes: list[int], groups: list[str]) -> ClassImages:
    data = coded_images(sizes)
    return ClassImages(data.images, data.labels, data.class_names, tuple(groups))


def test_within_groups_tasks_take_every_class_from_one_group():
    # groups: A 4 classes, B 3, C 2 (too small for 3-way: skipped)
    data = in_groups([4] * 9, ["A"] * 4 + ["B"] * 3 + ["C"] * 2)
    sampler = EpisodeSampler(data, 3, 1, 2, rotate=True, within_groups=True)
    assert sampler.groups == {"A": 4, "B": 3} and sampler.skipped_groups == {"C": 2}
    spec = sampler.describe(400, generator(3))
    group_of = [data.groups[c] for c in range(data.num_classes)]
    used = [{group_of[c] for c in task.tolist()} for task in spec.classes]
    assert all(len(groups) == 1 for groups in used)
    counts = {g: sum(groups == {g} for groups in used) for g in ("A", "B", "C")}
    assert counts["C"] == 0
    assert 150 < counts["A"] < 250 and 150 < counts["B"] < 250  # groups drawn uniformly
    assert all(len(set(task.tolist())) == 3 for task in spec.classes)
    assert int(spec.rotations.max()) > 0  # rotations as in the plain protocol
    task = sampler.gather(spec)
    assert task.support[0].shape == (400, 3, 1, 4, 4)


def test_within_groups_episodes_are_fixed_by_the_seed():
    data = in_groups([3] * 6, ["A"] * 3 + ["B"] * 3)
    sampler = EpisodeSampler(data, 2, 1, 1, within_groups=True)
    a, b = fixed_episodes(sampler, 50, seed=1), fixed_episodes(sampler, 50, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_within_groups_needs_a_group_large_enough():
    data = in_groups([3] * 5, ["A"] * 3 + ["B"] * 2)
    with pytest.raises(
        DataError,
        match=r"within-alphabet\) 4-way tasks need a group with at least 4 classes, but the "
        r"largest has 3 \(A 3, B 2\)\. Lower --ways to 3 or less",
    ):
        EpisodeSampler(data, 4, 1, 1, within_groups=True)


def test_within_groups_needs_groups():
    with pytest.raises(
        DataError, match=r"3 of 3 classes have no group \(e\.g\. 'class0'\)\. Use Omniglot's"
    ):
        EpisodeSampler(coded_images([3] * 3), 2, 1, 1, within_groups=True)


def test_sampler_refuses_too_few_classes():
    with pytest.raises(
        DataError,
        match=r"5-way tasks need at least 5 classes, but this split "
        r"has 3\. Lower --ways",
    ):
        EpisodeSampler(coded_images([4] * 3), num_ways=5, num_shots=1, num_query=1)


def test_sampler_refuses_classes_too_small_for_shots_and_query():
    data = coded_images([20, 12, 20, 19])
    with pytest.raises(
        DataError,
        match=r"num_shots \+ num_query = 5 \+ 15 = 20 images, but 2 of 4 classes have fewer "
        r"\(e\.g\. 'class1' has 12\)\. Lower --shots/--query or choose another split",
    ):
        EpisodeSampler(data, num_ways=2, num_shots=5, num_query=15)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_ways": 0}, r"`num_ways` must be a positive int, got 0"),
        ({"num_shots": -1}, r"`num_shots` must be a positive int, got -1"),
        ({"num_query": 1.5}, r"`num_query` must be a positive int, got 1\.5"),
        ({"num_ways": True}, r"`num_ways` must be a positive int, got True"),
        ({"dtype": torch.int64}, r"`dtype` must be a floating dtype"),
    ],
)
def test_sampler_refuses_bad_sizes(kwargs, match):
    arguments = {"num_ways": 2, "num_shots": 1, "num_query": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        EpisodeSampler(coded_images([3] * 3), **arguments)


def test_sampler_refuses_rotating_non_square_images():
    data = ClassImages(
        torch.zeros(4, 1, 3, 5, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ("a", "b")
    )
    with pytest.raises(ValueError, match=r"rotate=True needs square images, got 3x5"):
        EpisodeSampler(data, 2, 1, 1, rotate=True)


def test_describe_and_gather_refuse_mismatches():
    sampler = EpisodeSampler(coded_images([4] * 4), 2, 1, 1)
    with pytest.raises(ValueError, match=r"`num_tasks` must be a positive int, got 0"):
        sampler.describe(0, generator())
    other = EpisodeSampler(coded_images([4] * 4), 3, 1, 1).describe(2, generator())
    with pytest.raises(ValueError, match=r"expected \[T, 2, 2\].*Gather a spec with the sampler"):
        sampler.gather(other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_on_cuda_matches_cpu_with_a_cpu_generator():
    data = coded_images([7] * 9, side=6)
    cpu = EpisodeSampler(data, 5, 2, 3, rotate=True)
    cuda = EpisodeSampler(data.to("cuda"), 5, 2, 3, rotate=True)
    a = fixed_episodes(cpu, 100, seed=0)
    b = fixed_episodes(cuda, 100, seed=0)
    assert b.indices.device.type == "cuda"
    assert all(torch.equal(x, y.cpu()) for x, y in zip(a, b, strict=True))
    assert torch.equal(cpu.gather(a).query[0], cuda.gather(b).query[0].cpu())
    task = cuda.sample(4, torch.Generator(device="cuda").manual_seed(0))
    assert task.support[0].device.type == "cuda"
    with pytest.raises(ValueError, match=r"the generator is on cuda"):
        cpu.describe(2, torch.Generator(device="cuda"))


# -------------------------------------------------------------------------- load_splits


def test_load_splits_folder(tmp_path):
    make_folder(tmp_path, {f"c{i}": 2 for i in range(10)})
    parts = load_splits("folder", tmp_path, split="0.6,0.2,0.2", image_size=8, channels=1, seed=1)
    assert {k: v.num_classes for k, v in parts.items()} == {"train": 6, "val": 2, "test": 2}
    assert parts["train"].image_shape == (1, 8, 8)
    again = load_splits("folder", tmp_path, split="0.6,0.2,0.2", image_size=8, channels=1, seed=1)
    assert again["test"].class_names == parts["test"].class_names
    default = load_splits("folder", tmp_path, image_size=8)
    assert {k: v.num_classes for k, v in default.items()} == {"train": 7, "val": 1, "test": 2}


@pytest.mark.parametrize(
    ("dataset", "kwargs", "match"),
    [
        ("imagenet", {}, r"unknown dataset 'imagenet'; choose one of"),
        ("omniglot", {"channels": 3}, r"`channels` applies to dataset='folder' only"),
        ("folder", {"download": True}, r"download=True is only possible for omniglot"),
        ("folder", {"image_size": 0}, r"`image_size` must be a positive int"),
        ("folder", {"split": "0.5,0.5"}, r"expected three non-negative proportions"),
        ("miniimagenet", {"split": "maml"}, r"miniimagenet has one split, 'ravi'"),
    ],
)
def test_load_splits_refuses_bad_options(tmp_path, dataset, kwargs, match):
    make_folder(tmp_path, {"a": 1, "b": 1, "c": 1})
    with pytest.raises(ValueError, match=match):
        load_splits(dataset, tmp_path, **kwargs)
