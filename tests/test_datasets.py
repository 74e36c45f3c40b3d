"""CIFAR-FS, FC100, tiered-ImageNet and CUB on tiny files in their published layouts."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest_datasets import (
    SUPERCLASSES,
    CreatesAFile,
    cifar_pixel,
    cub_colour,
    make_cifar100,
    make_cub,
    make_tar,
    make_tiered,
    md5,
    tiered_colour,
)
from conftest_images import snapshot

import fmaml.tasks.cifar100 as cifar100
import fmaml.tasks.cub as cub
from fmaml.tasks.cifar100 import (
    CIFAR100_MD5,
    load_cifarfs_splits,
    load_fc100_splits,
    read_cifar100,
)
from fmaml.tasks.cub import load_cub_splits
from fmaml.tasks.datasets import load_splits
from fmaml.tasks.images import DataError
from fmaml.tasks.published import published_split
from fmaml.tasks.tieredimagenet import load_tieredimagenet, load_tieredimagenet_splits

SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def _cache_in_tmp(isolated_cache):
    return isolated_cache


def assert_disjoint(splits: dict) -> None:
    seen: dict[str, str] = {}
    for split, data in splits.items():
        for name in data.class_names:
            assert name not in seen, f"{name} is in {seen.get(name)} and {split}"
            seen[name] = split


# ------------------------------------------------------------------- the published splits


def test_published_splits_have_the_papers_counts_and_no_shared_class():
    sizes = {"cifarfs": (64, 16, 20), "fc100": (12, 4, 4), "cub": (100, 50, 50)}
    for name, counts in sizes.items():
        split = published_split(name)
        assert tuple(len(split[s]) for s in SPLITS) == counts
        every = [n for s in SPLITS for n in split[s]]
        assert len(set(every)) == len(every) == sum(counts)
    assert set(published_split("fc100")["train"]) >= {"fish", "flowers", "reptiles", "trees"}
    assert set(published_split("fc100")["test"]) == {
        "aquatic_mammals",
        "insects",
        "medium_mammals",
        "people",
    }


def test_cub_split_is_chen_et_al_rule_on_sorted_folders():
    split = published_split("cub")
    classes = sorted(n for s in SPLITS for n in split[s])
    assert classes[0] == "001.Black_footed_Albatross" and classes[-1] == "200.Common_Yellowthroat"
    assert list(split["train"]) == [c for i, c in enumerate(classes) if i % 2 == 0]
    assert list(split["val"]) == [c for i, c in enumerate(classes) if i % 4 == 1]
    assert list(split["test"]) == [c for i, c in enumerate(classes) if i % 4 == 3]


# ------------------------------------------------------------------------------ CIFAR-100


@pytest.mark.parametrize("python2", [True, False])
def test_cifarfs_and_fc100_from_the_unpacked_folder(tmp_path, python2):
    make_cifar100(tmp_path, python2=python2)
    before = snapshot(tmp_path)
    fs = load_cifarfs_splits(tmp_path, verify=False)
    fc = load_fc100_splits(tmp_path / "cifar-100-python", verify=False)  # the folder itself
    assert [fs[s].num_classes for s in SPLITS] == [64, 16, 20]
    assert [fc[s].num_classes for s in SPLITS] == [60, 20, 20]
    assert_disjoint(fs)
    assert_disjoint(fc)
    for data in (*fs.values(), *fc.values()):
        assert (
            data.image_shape == (3, 32, 32)
            and data.class_sizes().tolist() == [3] * data.num_classes
        )
        assert list(data.class_names) == sorted(data.class_names)
    assert set(fs["test"].class_names) == set(published_split("cifarfs")["test"])
    test_superclasses = {g for g in fc["test"].groups}
    assert test_superclasses == set(published_split("fc100")["test"])
    for superclass in test_superclasses:
        assert set(SUPERCLASSES[superclass]) <= set(fc["test"].class_names)
    # every image is its class's: the pixel values written for that class
    fine = sorted(n for names in SUPERCLASSES.values() for n in names)
    data = fs["val"]
    for c, name in enumerate(data.class_names):
        values = set(data.images[data.labels == c][:, 0, 0, 0].tolist())
        expected = {cifar_pixel(fine.index(name), i) for i in range(300)}
        assert values <= expected and len(values) == 3
    assert snapshot(tmp_path) == before


def test_cifar_resized_images_are_cached(tmp_path, isolated_cache):
    make_cifar100(tmp_path)
    splits = load_splits("cifarfs", tmp_path, image_size=8, verify=False)
    assert splits["train"].image_shape == (3, 8, 8)
    assert list(isolated_cache.glob("cifar100-8x8-RGB-*.npz"))
    again = load_splits("cifarfs", tmp_path, image_size=8, verify=False)
    assert torch.equal(again["test"].images, splits["test"].images)


def test_cifar_archive_is_checked_and_unpacked_into_the_cache(
    tmp_path, isolated_cache, monkeypatch
):
    make_cifar100(tmp_path / "source")
    root = tmp_path / "data"
    archive = make_tar(tmp_path / "source", "cifar-100-python", root / "cifar-100-python.tar.gz")
    before = snapshot(root)
    with pytest.raises(DataError) as caught:
        load_cifarfs_splits(root)
    message = str(caught.value)
    assert "cifar-100-python.tar.gz" in message and CIFAR100_MD5[archive.name] in message
    assert md5(archive) in message and "--no-checksum" in message
    assert not (isolated_cache / "unpacked").exists(), "nothing unpacked from a bad archive"

    splits = load_cifarfs_splits(root, verify=False)
    assert [splits[s].num_classes for s in SPLITS] == [64, 16, 20]
    assert len(list((isolated_cache / "unpacked").iterdir())) == 1
    monkeypatch.setitem(cifar100.CIFAR100_MD5, archive.name, md5(archive))
    assert load_fc100_splits(root)["val"].num_classes == 20  # checked, and matches
    assert snapshot(root) == before


def test_unpacked_files_are_checked_against_torchvisions_digests(tmp_path):
    folder = make_cifar100(tmp_path)
    with pytest.raises(DataError, match=rf"'{folder / 'train'}'.*expected md5 16019d7e.*found"):
        read_cifar100(tmp_path)


def test_a_truncated_archive_is_a_data_error_and_leaves_nothing(tmp_path, isolated_cache):
    make_cifar100(tmp_path / "source")
    root = tmp_path / "data"
    archive = make_tar(tmp_path / "source", "cifar-100-python", root / "cifar-100-python.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    before = snapshot(root)
    with pytest.raises(DataError, match=r"could not unpack .*truncated or damaged"):
        read_cifar100(root, verify=False)
    assert snapshot(root) == before
    assert not list((isolated_cache / "unpacked").iterdir()), "no half-unpacked folder"


@pytest.mark.parametrize("damage", ["truncate", "empty", "keys", "shape"])
def test_damaged_cifar_pickles_are_data_errors(tmp_path, damage):
    folder = make_cifar100(tmp_path)
    train = folder / "train"
    if damage == "truncate":
        train.write_bytes(train.read_bytes()[:5000])
    elif damage == "empty":
        train.write_bytes(b"")
    elif damage == "keys":
        train.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}))
    else:
        stored = {"data": np.zeros((2, 1024), np.uint8), "fine_labels": [0, 1]}
        train.write_bytes(pickle.dumps({**stored, "coarse_labels": [0, 1]}))
    expected = {
        "truncate": r"truncated or damaged",
        "empty": r"truncated or damaged",
        "keys": r"missing",
        "shape": r"uint8 \[N, 3072\], found \[2, 1024\]",
    }[damage]
    with pytest.raises(DataError, match=expected):
        load_cifarfs_splits(tmp_path, verify=False)


def test_a_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path):
    folder = make_cifar100(tmp_path / "data")
    target = tmp_path / "created-by-the-pickle"
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": CreatesAFile(target)}))
    before = snapshot(tmp_path / "data")
    with pytest.raises(DataError, match=r"refused to read '.*meta': it asks for io\.open"):
        load_fc100_splits(tmp_path / "data", verify=False)
    assert not target.exists()
    assert snapshot(tmp_path / "data") == before


def test_download_fetches_into_the_cache_with_the_same_checks(
    tmp_path, isolated_cache, monkeypatch
):
    make_cifar100(tmp_path / "source")
    archive = make_tar(
        tmp_path / "source", "cifar-100-python", tmp_path / "mirror" / "cifar-100-python.tar.gz"
    )
    root = tmp_path / "data"
    root.mkdir()
    url = archive.as_uri()
    with pytest.raises(DataError, match=r"could not download .*put it in '.*data'"):
        read_cifar100(root, download=True, url=(tmp_path / "nothing").as_uri())
    with pytest.raises(DataError, match=r"does not match its published checksum.*deleted"):
        read_cifar100(root, download=True, url=url)
    assert not list((isolated_cache / "downloads").iterdir()), "the bad copy was deleted"
    monkeypatch.setitem(cifar100.CIFAR100_MD5, archive.name, md5(archive))
    data = read_cifar100(root, download=True, url=url)
    assert data.images.shape == (300, 3, 32, 32)
    assert (isolated_cache / "downloads" / archive.name).is_file()
    assert not list(root.iterdir()), "nothing written into the data folder"


def test_missing_data_is_a_data_error_that_creates_nothing(tmp_path):
    missing = tmp_path / "no-such-folder"
    for dataset in ("cifarfs", "fc100", "tieredimagenet", "cub"):
        with pytest.raises(DataError, match=rf"data folder '{missing}' does not exist"):
            load_splits(dataset, missing, download=dataset != "tieredimagenet")
        assert not missing.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"found neither cifar-100-python.tar.gz nor"):
        load_splits("fc100", tmp_path / "empty")
    with pytest.raises(DataError, match=r"found neither CUB_200_2011/images/ nor"):
        load_splits("cub", tmp_path / "empty")


# ------------------------------------------------------------------------ tiered-ImageNet


def test_tiered_imagenet_release_files_give_351_97_160_classes(tmp_path):
    make_tiered(tmp_path / "data", side=8)
    before = snapshot(tmp_path / "data")
    splits = load_tieredimagenet_splits(tmp_path / "data", image_size=8)
    assert [splits[s].num_classes for s in SPLITS] == [351, 97, 160]
    assert [len(set(splits[s].groups)) for s in SPLITS] == [20, 6, 8]
    assert_disjoint(splits)
    for split in SPLITS:
        data = splits[split]
        pixel = data.images[:, :, 4, 4]
        expected = torch.tensor(
            [tiered_colour(split, int(n[2:])) for n in data.class_names], dtype=torch.uint8
        )
        assert torch.equal(pixel, expected[data.labels])
    assert snapshot(tmp_path / "data") == before


def test_tiered_imagenet_npz_layout_matches_the_png_layout(tmp_path, isolated_cache):
    sizes = {"train": (2, 4), "val": (2, 3), "test": (2, 3)}
    make_tiered(tmp_path / "png", sizes=sizes, per_class=2)
    make_tiered(tmp_path / "npz", sizes=sizes, per_class=2, layout="npz")
    png = load_tieredimagenet(tmp_path / "png", "train")
    npz = load_tieredimagenet(tmp_path / "npz", "train")
    assert png.image_shape == (3, 84, 84) and torch.equal(png.images, npz.images)
    assert png.class_names == npz.class_names and png.groups == npz.groups
    assert list(isolated_cache.glob("tieredimagenet-train-84x84-RGB-*.npz"))
    small = load_tieredimagenet(tmp_path / "npz", "val", image_size=10)
    assert small.image_shape == (3, 10, 10)


@pytest.mark.parametrize("file", ["labels", "images_png"])
def test_a_crafted_tiered_pickle_is_refused_and_runs_nothing(tmp_path, file):
    root = tmp_path / "data"
    make_tiered(root, sizes={"train": (1, 2), "val": (1, 2), "test": (1, 2)})
    target = tmp_path / "created-by-the-pickle"
    (root / f"train_{file}.pkl").write_bytes(pickle.dumps([CreatesAFile(target)]))
    before = snapshot(root)
    with pytest.raises(DataError, match=rf"refused to read '.*train_{file}\.pkl'.*io\.open"):
        load_tieredimagenet(root, "train")
    assert not target.exists() and snapshot(root) == before


def test_damaged_tiered_files_are_data_errors(tmp_path):
    root = tmp_path / "data"
    make_tiered(root, sizes={"train": (1, 3), "val": (1, 2), "test": (1, 2)}, side=8)
    images = root / "train_images_png.pkl"
    images.write_bytes(images.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"train_images_png\.pkl.*truncated or damaged"):
        load_tieredimagenet(root, "train")
    blobs = pickle.loads((root / "val_images_png.pkl").read_bytes(), encoding="latin1")
    blobs[1] = blobs[1][:30]  # a PNG cut short
    (root / "val_images_png.pkl").write_bytes(pickle.dumps(blobs))
    with pytest.raises(DataError, match=r"image 1 in '.*val_images_png\.pkl' is not a readable"):
        load_tieredimagenet(root, "val")
    np.savez(root / "test_images.npz", images=np.zeros((5, 8, 8, 3), np.uint8))
    (root / "test_images_png.pkl").unlink()
    with pytest.raises(DataError, match=r"holds 5 images but the labels pickle 2 labels"):
        load_tieredimagenet(root, "test")
    (root / "test_images.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match=r"test_images\.npz.*truncated or damaged"):
        load_tieredimagenet(root, "test")


def test_missing_tiered_files_say_what_to_get_and_where(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DataError, match=r"train_labels\.pkl is not in .*no stable download"):
        load_splits("tieredimagenet", root)
    with pytest.raises(ValueError, match=r"download=True is only possible for"):
        load_splits("tieredimagenet", root, download=True)


# ------------------------------------------------------------------------------------ CUB


def test_cub_folder_gives_100_50_50_classes(tmp_path):
    make_cub(tmp_path / "data")
    before = snapshot(tmp_path / "data")
    splits = load_cub_splits(tmp_path / "data", image_size=8)
    assert [splits[s].num_classes for s in SPLITS] == [100, 50, 50]
    assert_disjoint(splits)
    assert splits["test"].class_names[0] == "004.Groove_billed_Ani"
    data = splits["val"]
    assert data.image_shape == (3, 8, 8) and len(data) == 100
    first = data.images[data.labels == 0][:, :, 4, 4].int()  # 002.Laysan_Albatross, index 1
    assert (first - torch.tensor(cub_colour(1))).abs().max() <= 4
    assert snapshot(tmp_path / "data") == before
    # root may also be the CUB_200_2011 folder itself
    assert load_cub_splits(tmp_path / "data" / "CUB_200_2011", image_size=8)["train"].num_classes


def test_cub_archive_checksum_and_unpacking(tmp_path, isolated_cache, monkeypatch):
    make_cub(tmp_path / "source", per_class=1)
    root = tmp_path / "data"
    archive = make_tar(tmp_path / "source", "CUB_200_2011", root / "CUB_200_2011.tgz")
    before = snapshot(root)
    with pytest.raises(DataError) as caught:
        load_cub_splits(root, image_size=8)
    assert "97eceeb196236b17998738112f37df78" in str(caught.value)
    assert md5(archive) in str(caught.value) and "CUB_200_2011.tgz" in str(caught.value)
    assert load_cub_splits(root, image_size=8, verify=False)["val"].num_classes == 50
    monkeypatch.setattr(cub, "CUB_MD5", md5(archive))
    empty = tmp_path / "empty"
    empty.mkdir()
    splits = load_cub_splits(empty, image_size=8, download=True, url=archive.as_uri())
    assert splits["test"].num_classes == 50
    assert snapshot(root) == before
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(DataError, match=r"could not unpack .*truncated or damaged"):
        load_cub_splits(root, image_size=8, verify=False)


def test_cub_folders_that_are_not_cubs_are_named(tmp_path):
    images = make_cub(tmp_path, per_class=1) / "images"
    shutil.rmtree(images / "002.Laysan_Albatross")
    (images / "201.Dodo").mkdir()
    with pytest.raises(DataError, match=r"missing: +\['002\.Laysan_Albatross'\]\n.*'201\.Dodo'"):
        load_cub_splits(tmp_path)
