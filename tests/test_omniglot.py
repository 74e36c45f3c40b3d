"""Omniglot: layouts, inversion, splits, download (from a local server) and bad data."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest_images import OMNIGLOT_SUBSET, isolated_cache, make_omniglot, make_zip, snapshot
from PIL import Image

import fmaml.tasks.images as images_module
import fmaml.tasks.omniglot as omniglot_module
from fmaml.tasks.datasets import load_splits
from fmaml.tasks.images import ClassImages, DataError, EpisodeSampler
from fmaml.tasks.omniglot import (
    BACKGROUND_ALPHABETS,
    EVALUATION_ALPHABETS,
    download_omniglot,
    load_omniglot,
    split_omniglot,
)

_ = isolated_cache


@pytest.fixture(autouse=True)
def _cache_in_tmp(isolated_cache):
    return isolated_cache


SMALL = {"Greek": 3, "Latin": 2, "Angelic": 2, "Keble": 1}  # 2 background, 2 evaluation


def test_the_alphabet_lists_are_the_official_ones():
    assert len(BACKGROUND_ALPHABETS) == 30 and len(EVALUATION_ALPHABETS) == 20
    assert not BACKGROUND_ALPHABETS & EVALUATION_ALPHABETS


def test_load_a_folder_of_alphabets(tmp_path):
    files = make_omniglot(tmp_path, SMALL, images_per_character=3, size=16)
    data = load_omniglot(tmp_path, image_size=8)
    assert data.num_classes == 8 and len(data) == 24
    assert data.images.shape == (24, 1, 8, 8) and data.images.dtype == torch.uint8
    assert data.class_names[:2] == ("Angelic/character01", "Angelic/character02")
    assert data.groups[0] == "Angelic" and data.groups[-1] == "Latin"
    assert data.class_sizes().tolist() == [3] * 8
    # inverted: white paper becomes 0, black strokes 255
    original = np.asarray(Image.open(files[0]).convert("L").resize((8, 8), Image.LANCZOS))
    assert data.images[0, 0].tolist() == (255 - original).tolist()


def test_blank_paper_is_zero_and_strokes_are_one_after_scaling(tmp_path):
    folder = tmp_path / "Greek" / "character01"
    folder.mkdir(parents=True)
    paper = np.ones((20, 20), dtype=bool)
    paper[:, :10] = False  # left half black ink
    for i in range(2):
        Image.fromarray(paper).save(folder / f"{i}.png")
    data = load_omniglot(tmp_path, image_size=10)
    task = EpisodeSampler(data, 1, 1, 1).sample(1, torch.Generator().manual_seed(0))
    x = task.support[0][0, 0, 0]
    assert float(x[:, :4].min()) > 0.99 and float(x[:, 6:].max()) < 0.01
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0


def test_the_archive_layout_gives_the_same_classes(tmp_path):
    make_omniglot(tmp_path / "flat", SMALL)
    for name, alphabets in [
        ("images_background", {"Greek", "Latin"}),
        ("images_evaluation", {"Angelic", "Keble"}),
    ]:
        for alphabet in alphabets:
            shutil.copytree(tmp_path / "flat" / alphabet, tmp_path / "archives" / name / alphabet)
    flat = load_omniglot(tmp_path / "flat", image_size=8)
    archives = load_omniglot(tmp_path / "archives", image_size=8)
    assert archives.class_names == flat.class_names and archives.groups == flat.groups
    assert torch.equal(archives.images, flat.images)


def test_second_load_hits_the_cache(tmp_path, monkeypatch, isolated_cache):
    make_omniglot(tmp_path, SMALL, images_per_character=2)
    before = snapshot(tmp_path)
    calls = []
    real = images_module.decode_image
    monkeypatch.setattr(images_module, "decode_image", lambda *a: calls.append(a[0]) or real(*a))
    first = load_omniglot(tmp_path, image_size=8)
    assert len(calls) == 16
    second = load_omniglot(tmp_path, image_size=8)
    assert len(calls) == 16
    assert torch.equal(first.images, second.images)
    assert len(list(isolated_cache.glob("omniglot-8x8-L-inverted-*.npz"))) == 1
    assert snapshot(tmp_path) == before  # nothing written next to the data


# ------------------------------------------------------------------------------ splits


def full_omniglot() -> ClassImages:
    """1,623 in-memory characters with their alphabets, one tiny image each."""
    alphabets = sorted(BACKGROUND_ALPHABETS) + sorted(EVALUATION_ALPHABETS)
    groups = [alphabets[c % 50] for c in range(1623)]
    return ClassImages(
        torch.zeros(1623, 1, 2, 2, dtype=torch.uint8),
        torch.arange(1623),
        tuple(f"{g}/character{c:04d}" for c, g in enumerate(groups)),
        tuple(groups),
    )


def test_maml_split_is_1100_100_423_disjoint_and_seeded():
    data = full_omniglot()
    parts = split_omniglot(data, "maml", seed=0)
    names = {k: set(v.class_names) for k, v in parts.items()}
    assert {k: len(v) for k, v in names.items()} == {"train": 1100, "val": 100, "test": 423}
    assert not names["train"] & names["val"] and not names["train"] & names["test"]
    assert not names["val"] & names["test"]
    assert split_omniglot(data, None, seed=0)["test"].class_names == parts["test"].class_names
    assert split_omniglot(data, "maml", seed=1)["test"].class_names != parts["test"].class_names


def test_maml_split_needs_the_full_set(tmp_path):
    make_omniglot(tmp_path, SMALL, images_per_character=1)
    data = load_omniglot(tmp_path, image_size=4)
    with pytest.raises(
        DataError,
        match=r"split 'maml' takes MAML's 1100 / 100 / 423 characters of all 1623, but the "
        r"data holds 8 .*Use a proportional split such as 'alphabet:0\.75,0,0\.25'",
    ):
        split_omniglot(data, "maml")


def test_proportional_alphabet_split_keeps_alphabets_apart():
    data = full_omniglot().subset(range(0, 1623, 7))
    parts = split_omniglot(data, "alphabet:0.7,0.1,0.2", seed=2)
    groups = {k: set(v.groups) for k, v in parts.items()}
    assert {k: len(v) for k, v in groups.items()} == {"train": 35, "val": 5, "test": 10}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    again = split_omniglot(data, "alphabet:0.7,0.1,0.2", seed=2)
    assert again["val"].class_names == parts["val"].class_names


def test_character_split_keeps_characters_apart():
    data = full_omniglot()
    parts = split_omniglot(data, "character:0.7,0.1,0.2", seed=0)
    names = {k: set(v.class_names) for k, v in parts.items()}
    assert {k: len(v) for k, v in names.items()} == {"train": 1136, "val": 162, "test": 325}
    assert not names["train"] & names["test"] and not names["val"] & names["test"]


def test_archive_split_trains_on_background_and_tests_on_evaluation():
    data = full_omniglot()
    parts = split_omniglot(data, "alphabet")
    assert sorted(parts) == ["test", "train"]
    assert set(parts["train"].groups) == BACKGROUND_ALPHABETS
    assert set(parts["test"].groups) == EVALUATION_ALPHABETS
    carved = split_omniglot(data, "alphabet:0.2", seed=3)
    assert len(set(carved["val"].groups)) == 6 and len(set(carved["train"].groups)) == 24
    assert set(carved["val"].groups) | set(carved["train"].groups) == BACKGROUND_ALPHABETS
    assert set(carved["test"].groups) == EVALUATION_ALPHABETS


def test_archive_split_needs_both_archives(tmp_path):
    make_omniglot(tmp_path, {"Greek": 2, "Latin": 2}, images_per_character=1)
    data = load_omniglot(tmp_path, image_size=4)
    with pytest.raises(
        DataError,
        match=r"holds 2 background and 0 evaluation alphabets\. Add "
        r"images_evaluation .*or use a proportional split",
    ):
        split_omniglot(data, "alphabet")


def test_archive_split_refuses_unknown_alphabets():
    data = ClassImages(
        torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
        torch.arange(2),
        ("Elvish/c1", "Greek/c1"),
        ("Elvish", "Greek"),
    )
    with pytest.raises(DataError, match=r"in neither: \['Elvish'\]"):
        split_omniglot(data, "alphabet")


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ("maml:1", r"unknown split 'maml:1'"),
        ("random", r"unknown split 'random'. Use 'maml', 'alphabet'"),
        ("character", r"unknown split 'character'"),
        ("alphabet:1.5", r"'alphabet:V' takes a validation proportion 0 <= V < 1"),
        ("alphabet:x", r"'alphabet:V' takes a validation proportion"),
        ("character:0.5,0.5,0.5", r"sum to 1\.5, not 1"),
    ],
)
def test_bad_split_strings(split, match):
    with pytest.raises(ValueError, match=match):
        split_omniglot(full_omniglot(), split)


def test_partial_default_split_via_load_splits(tmp_path):
    make_omniglot(tmp_path, {f"Alpha{i}": 2 for i in range(8)}, images_per_character=2)
    parts = load_splits("omniglot", tmp_path, image_size=6)
    assert sorted(parts) == ["test", "train"]  # no validation alphabets: "val" is absent
    assert len(set(parts["train"].groups)) == 6 and len(set(parts["test"].groups)) == 2
    assert parts["train"].image_shape == (1, 6, 6)


# ---------------------------------------------------------------------------- download


@pytest.fixture
def archives(tmp_path):
    """Official-looking zips of a tiny Omniglot; returns (folder with zips, {name: md5})."""
    source = tmp_path / "source"
    make_omniglot(source / "images_background", {"Greek": 2}, images_per_character=2)
    make_omniglot(source / "images_evaluation", {"Keble": 2}, images_per_character=2)
    mirror = tmp_path / "mirror"
    sums = {}
    for name in ("images_background", "images_evaluation"):
        _, sums[name] = make_zip(source, name, mirror)
    return mirror, sums


@pytest.fixture
def http_mirror(archives):
    """Serve the zips on 127.0.0.1 (no internet needed); yields (base URL, md5s)."""
    folder, sums = archives

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", sums
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_over_http_then_load(tmp_path, http_mirror, monkeypatch):
    base_url, sums = http_mirror
    monkeypatch.setattr(omniglot_module, "OMNIGLOT_ARCHIVES", sums)
    root = tmp_path / "omniglot"
    data = load_omniglot(root, image_size=8, download=True, base_url=base_url)
    assert (root / "images_background" / "Greek").is_dir()
    assert (root / "images_evaluation" / "Keble").is_dir()
    assert not list(root.glob("*.zip"))  # archives deleted after unzipping
    assert data.num_classes == 4 and set(data.groups) == {"Greek", "Keble"}
    parts = split_omniglot(data, "alphabet")
    assert parts["train"].groups == ("Greek", "Greek")


def test_download_from_a_file_url_mirror(tmp_path, archives):
    folder, sums = archives
    root = tmp_path / "omniglot"
    download_omniglot(root, base_url=folder.as_uri(), archives=sums)
    assert sorted(p.name for p in root.iterdir()) == ["images_background", "images_evaluation"]
    # already there: nothing fetched again (a broken URL would fail otherwise)
    download_omniglot(root, base_url="file:///nowhere", archives=sums)


def test_download_fetches_only_the_missing_archive(tmp_path, archives, monkeypatch):
    folder, sums = archives
    monkeypatch.setattr(omniglot_module, "OMNIGLOT_ARCHIVES", sums)
    root = tmp_path / "omniglot"
    make_omniglot(root / "images_background", {"Latin": 1}, images_per_character=2)
    data = load_omniglot(root, image_size=4, download=True, base_url=folder.as_uri())
    assert set(data.groups) == {"Latin", "Keble"}  # Greek's archive was not fetched


def test_download_refuses_a_bad_checksum(tmp_path, archives):
    folder, _ = archives
    root = tmp_path / "omniglot"
    bad = {"images_background": "0" * 32}
    with pytest.raises(DataError, match=r"did not match its md5 checksum 0{32}.*deleted"):
        download_omniglot(root, base_url=folder.as_uri(), archives=bad)
    assert not (root / "images_background.zip").exists()
    assert not (root / "images_background").exists()


def test_download_failure_is_a_clear_error(tmp_path, archives):
    _, sums = archives
    with pytest.raises(
        DataError,
        match=r"could not download file:///nowhere/images_background"
        r"\.zip .*download images_background\.zip by hand",
    ):
        download_omniglot(tmp_path / "o", base_url="file:///nowhere", archives=sums)


def test_a_failed_download_leaves_no_folder_it_made(tmp_path, archives):
    """No network (here: no mirror): the data folder and the parents made for it are removed
    again, so the next try starts as the first did; a folder that was there stays."""
    _, sums = archives
    home = tmp_path / "home"
    home.mkdir()
    with pytest.raises(DataError, match=r"could not download"):
        download_omniglot(home / "data" / "omniglot", base_url="file:///nowhere", archives=sums)
    assert list(home.iterdir()) == []
    (home / "kept").mkdir()
    with pytest.raises(DataError, match=r"could not download"):
        download_omniglot(home / "kept", base_url="file:///nowhere", archives=sums)
    assert [p.name for p in home.iterdir()] == ["kept"]


def test_an_archive_without_its_folder_is_refused(tmp_path):
    source = tmp_path / "source"
    make_omniglot(source / "wrong_name", {"Greek": 1}, images_per_character=1)
    archive, md5 = make_zip(source, "wrong_name", tmp_path / "mirror")
    archive.rename(archive.with_name("images_background.zip"))
    with pytest.raises(DataError, match=r"did not contain a folder images_background/"):
        download_omniglot(
            tmp_path / "o",
            base_url=(tmp_path / "mirror").as_uri(),
            archives={"images_background": md5},
        )


def test_the_default_download_source_is_the_official_one():
    assert omniglot_module.OMNIGLOT_URL == (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
    )
    assert omniglot_module.OMNIGLOT_ARCHIVES == {
        "images_background": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    }


# ---------------------------------------------------------------------------- bad data


def test_missing_root(tmp_path):
    with pytest.raises(
        DataError,
        match=r"the data folder '.*nothing' does not exist\. Pass "
        r"download=True",
    ):
        load_omniglot(tmp_path / "nothing")


def test_empty_root(tmp_path):
    with pytest.raises(DataError, match=r"no Omniglot alphabets under .*Pass download=True"):
        load_omniglot(tmp_path)


def test_root_one_level_too_high(tmp_path):
    make_omniglot(tmp_path / "omniglot" / "subset", {"Greek": 1}, images_per_character=1)
    with pytest.raises(DataError, match=r"holds no images .*is the root one level too high"):
        load_omniglot(tmp_path)


def test_alphabet_without_characters(tmp_path):
    (tmp_path / "Greek").mkdir()
    with pytest.raises(DataError, match=r"alphabet folder '.*Greek' holds no character folders"):
        load_omniglot(tmp_path)


def test_truncated_image_is_named(tmp_path):
    files = make_omniglot(tmp_path, {"Greek": 2}, images_per_character=2)
    files[1].write_bytes(files[1].read_bytes()[:40])
    with pytest.raises(DataError, match=rf"could not read the image '.*{files[1].name}'"):
        load_omniglot(tmp_path)


def test_too_few_drawings_for_the_episode(tmp_path):
    make_omniglot(tmp_path, {"Greek": 6}, images_per_character=3)
    data = load_omniglot(tmp_path, image_size=4)
    with pytest.raises(DataError, match=r"= 4 images, but 6 of 6 classes have fewer"):
        EpisodeSampler(data, num_ways=5, num_shots=1, num_query=3)


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not OMNIGLOT_SUBSET.is_dir(), reason="needs ../shared/data/omniglot")
def test_the_shared_omniglot_subset(isolated_cache, monkeypatch):
    before = snapshot(OMNIGLOT_SUBSET)
    decoded = []
    real_decode = images_module.decode_image
    monkeypatch.setattr(
        images_module, "decode_image", lambda *args: decoded.append(1) or real_decode(*args)
    )
    data = load_omniglot(OMNIGLOT_SUBSET)
    assert len(decoded) == 4840
    assert data.num_classes == 242 and len(data) == 242 * 20
    assert data.class_sizes().unique().tolist() == [20]
    assert data.images.shape == (4840, 1, 28, 28) and data.images.dtype == torch.uint8
    assert len(set(data.groups)) == 8
    # strokes are 255 after inversion, most of the paper 0
    assert int(data.images.max()) == 255 and int(data.images.min()) == 0
    assert 0.02 < float(data.images.float().mean() / 255) < 0.3

    # the cache went to the user cache folder, and the data folder is as it was (whether or
    # not this process may write there)
    assert len(list(isolated_cache.glob("omniglot-28x28-L-inverted-*.npz"))) == 1
    assert snapshot(OMNIGLOT_SUBSET) == before
    again = load_omniglot(OMNIGLOT_SUBSET)
    assert len(decoded) == 4840  # read from the cache: nothing decoded again
    assert torch.equal(again.images, data.images)

    parts = split_omniglot(data, "alphabet:0.75,0,0.25", seed=0)
    assert sorted(parts) == ["test", "train"]
    train, test = set(parts["train"].groups), set(parts["test"].groups)
    assert (len(train), len(test)) == (6, 2) and not train & test
    assert parts["train"].num_classes + parts["test"].num_classes == 242
    with pytest.raises(DataError, match=r"but the data holds 242"):
        split_omniglot(data, "maml")

    task = EpisodeSampler(parts["train"], 20, 1, 5, rotate=True).sample(
        8, torch.Generator().manual_seed(0)
    )
    assert task.support[0].shape == (8, 20, 1, 28, 28)
    assert task.query[0].shape == (8, 100, 1, 28, 28)
    assert 0.0 <= float(task.query[0].min()) and float(task.query[0].max()) == 1.0
