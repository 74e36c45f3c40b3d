"""Safety with untrusted files and the user's data (README, "Safety guarantees").

- No code runs from data: pickles are read without calling what they name, every
  ``torch.load`` is ``weights_only=True``, oversized images are refused.
- The user's folders are read-only to fmaml (caches live in the user cache folder).
- Every bad file gets a clear message, whatever its bytes (fuzzed with hypothesis).
"""

from __future__ import annotations

import ast
import builtins
import io
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest_images import (
    OMNIGLOT_SUBSET,
    folder_train_args,
    isolated_cache,
    make_folder,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fmaml.tasks.images import MAX_IMAGE_PIXELS, ClassImages, DataError, decode_image
from fmaml.tasks.miniimagenet import load_miniimagenet
from fmaml.tasks.safe_pickle import read_array_pickle
from fmaml.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fmaml.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
_ = isolated_cache
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(autouse=True)
def _cache_in_tmp(isolated_cache):
    return isolated_cache


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------------- pickles


class _CreatesAFile:
    """Unpickled by ``pickle.load``, this calls ``open(target, "w")``: the file appears."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


def _mini_imagenet_pickle(root: Path, split: str = "train", side: int = 6) -> dict:
    rows = np.arange(4 * side * side * 3, dtype=np.uint8).reshape(4, side, side, 3)
    stored = {"image_data": rows, "class_dict": {"n02": [2, 3], "n01": [0, 1]}}
    root.mkdir(parents=True, exist_ok=True)
    (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(stored, protocol=4))
    return stored


def test_a_crafted_mini_imagenet_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "created-by-the-pickle"
    payload = {"image_data": _CreatesAFile(target), "class_dict": {"n01": [0]}}
    root = tmp_path / "data"
    root.mkdir()
    (root / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(payload))
    pickle.loads(pickle.dumps(_CreatesAFile(tmp_path / "control"))).close()  # the payload works
    assert (tmp_path / "control").exists()

    with pytest.raises(
        DataError,
        match=r"refused to read '.*mini-imagenet-cache-train\.pkl': it asks for io\.open",
    ):
        load_miniimagenet(root, "train")
    assert not target.exists()

    for split in ("val", "test"):
        _mini_imagenet_pickle(root, split)
    result = invoke(
        "train", "--dataset", "miniimagenet", "--data-root", root, "--out", tmp_path / "r"
    )
    assert result.exit_code == 1
    assert "refused to read" in result.output and "io.open" in result.output
    assert "Traceback" not in result.output
    assert not target.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_published_pickle_contents_are_read_in_every_protocol(tmp_path, protocol):
    stored = {
        "image_data": np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3),
        "class_dict": {"n01": [0, np.int64(1)]},
        "extra": (np.arange(3, dtype=">i4"), np.float32(0.5), b"raw", {1, 2}, None),
    }
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(stored, protocol=protocol))
    read = read_array_pickle(path)
    assert np.array_equal(read["image_data"], stored["image_data"])
    assert read["image_data"].dtype == np.uint8 and read["image_data"].flags.writeable
    assert read["class_dict"] == {"n01": [0, 1]}
    big_endian, half, raw, numbers, nothing = read["extra"]
    assert big_endian.tolist() == [0, 1, 2] and big_endian.dtype == np.dtype("int32")
    assert float(half) == 0.5 and raw == b"raw" and numbers == {1, 2} and nothing is None


def test_a_fortran_ordered_array_keeps_its_values(tmp_path):
    array = np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(array, protocol=2))
    assert np.array_equal(read_array_pickle(tmp_path / "a.pkl"), array)


@pytest.mark.parametrize(
    ("content", "asks_for"),
    [
        (np.array([object()], dtype=object), "an array of dtype 'O8'"),
        (np.array(["a"]), "an array of dtype 'U1'"),
        (np.zeros(2, dtype=[("x", "i4")]), "an array of dtype 'V4'"),
        (io.BytesIO(b""), "_io.BytesIO"),
        (np.ma.masked_array([1, 2], mask=[0, 1]), "numpy.ma.core"),
    ],
)
def test_anything_but_containers_and_numeric_arrays_is_refused(tmp_path, content, asks_for):
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(DataError, match=rf"a\.pkl'.*{asks_for}"):
        read_array_pickle(tmp_path / "a.pkl")


def test_shared_references_are_walked_once(tmp_path):
    """A pickle's memo can make 2**60 paths through 60 lists: reading still takes no time."""
    nested: list = [np.zeros(1, np.uint8)]
    for _ in range(60):
        nested = [nested, nested]
    (tmp_path / "shared.pkl").write_bytes(pickle.dumps(nested))
    read = read_array_pickle(tmp_path / "shared.pkl")
    for _ in range(60):
        assert read[0] is read[1]  # still shared, not copied 2**60 times
        read = read[0]
    assert read[0].tolist() == [0]
    for _ in range(50):
        nested = [nested, nested]
    (tmp_path / "deep.pkl").write_bytes(pickle.dumps(nested))
    with pytest.raises(DataError, match="nested more than 100 deep"):
        read_array_pickle(tmp_path / "deep.pkl")


@FUZZ
@given(data=st.binary(max_size=400))
def test_any_bytes_as_a_pickle_give_a_result_or_a_data_error(tmp_path, data):
    root = tmp_path / "fuzz"
    root.mkdir(exist_ok=True)
    (root / "mini-imagenet-cache-train.pkl").write_bytes(data)
    try:
        loaded = load_miniimagenet(root, "train", image_size=6)
    except DataError as error:
        assert "mini-imagenet-cache-train.pkl" in str(error)
    else:
        assert isinstance(loaded, ClassImages)


@FUZZ
@given(protocol=st.integers(0, 5), cut=st.floats(0, 1), flips=st.lists(st.integers(0, 10**6)))
def test_damaged_mini_imagenet_pickles_give_a_result_or_a_data_error(
    tmp_path, protocol, cut, flips
):
    stored = {
        "image_data": np.arange(4 * 6 * 6 * 3, dtype=np.uint8).reshape(4, 6, 6, 3),
        "class_dict": {"n02": [2, 3], "n01": [0, 1]},
    }
    data = bytearray(pickle.dumps(stored, protocol=protocol))
    data = data[: max(1, round(cut * len(data)))] if cut < 0.5 else data
    for flip in flips:
        data[flip % len(data)] ^= 1 + flip % 255
    root = tmp_path / "fuzz"
    root.mkdir(exist_ok=True)
    (root / "mini-imagenet-cache-train.pkl").write_bytes(bytes(data))
    try:
        loaded = load_miniimagenet(root, "train", image_size=6)
    except DataError as error:
        assert "mini-imagenet-cache-train.pkl" in str(error)
    else:
        assert loaded.images.dtype == torch.uint8 and loaded.images.shape[1:] == (3, 6, 6)


@FUZZ
@given(text=st.text(max_size=200), header=st.booleans())
def test_any_split_csv_gives_a_result_or_a_data_error(tmp_path, text, header):
    root = tmp_path / "csv"
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (9, 9)).save(root / "images" / "a.jpg")
    (root / "train.csv").write_text(("filename,label\n" if header else "") + text)
    try:
        loaded = load_miniimagenet(root, "train", image_size=6, cache=False)
    except DataError as error:
        assert "train.csv" in str(error) or "images" in str(error)
    else:
        assert loaded.images.shape[1:] == (3, 6, 6)


# ------------------------------------------------------------ the code never unpickles


def _python_files() -> list[Path]:
    return sorted(
        [*(ROOT / "fmaml").rglob("*.py"), ROOT / "cli.py", *(ROOT / "benchmarks").rglob("*.py")]
    )


def test_every_torch_load_is_weights_only_and_nothing_else_unpickles():
    torch_loads, unsafe = 0, []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            name = f"{owner.id}.{node.func.attr}" if isinstance(owner, ast.Name) else None
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name == "torch.load":
                torch_loads += 1
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{where}: torch.load without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                unsafe.append(f"{where}: {name}")
            elif name == "np.load":
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and not flag.value):
                    unsafe.append(f"{where}: np.load with allow_pickle")
    assert torch_loads >= 1, "the scan must see the checkpoint reader"
    assert not unsafe


# ------------------------------------------------------------------------ images


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (40, 30)).save(path)
    monkeypatch.setenv("FMAML_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(
        DataError,
        match=r"refused the image '.*big\.png': it is 40 x 30 = 1,200 pixels, more than the "
        r"limit of 1,000 .*decompression bomb.*FMAML_MAX_IMAGE_PIXELS",
    ):
        decode_image(path, 8, "L")
    monkeypatch.setenv("FMAML_MAX_IMAGE_PIXELS", "1200")
    assert decode_image(path, 8, "L").shape == (8, 8)
    monkeypatch.delenv("FMAML_MAX_IMAGE_PIXELS")
    assert MAX_IMAGE_PIXELS == 64_000_000
    monkeypatch.setenv("FMAML_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DataError, match=r"FMAML_MAX_IMAGE_PIXELS must be a positive number"):
        decode_image(path, 8, "L")


def test_decompression_bombs_are_refused(tmp_path):
    """Small PNGs that claim 72 and 100 megapixels: over fmaml's limit, and over PIL's."""
    path = tmp_path / "bomb.png"
    Image.new("1", (8_500, 8_500)).save(path, optimize=True)
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"8500 x 8500 = 72,250,000 pixels, more than the limit"):
        decode_image(path, 28, "L")
    Image.new("1", (10_000, 10_000)).save(path, optimize=True)
    with pytest.raises(DataError, match=r"refused the image .*bomb\.png'.*fmaml's limit is"):
        decode_image(path, 28, "L")


def _png(mode: str, size: tuple[int, int]) -> bytes:
    stream = io.BytesIO()
    image = Image.new(mode, size)
    if mode == "P":
        image.info["transparency"] = 0
    image.save(stream, format="TIFF" if mode in ("CMYK", "I", "F") else "PNG")
    return stream.getvalue()


@FUZZ
@given(
    mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "I;16", "I", "F", "LA", "CMYK"]),
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    cut=st.floats(0, 1),
    flips=st.lists(st.integers(0, 10**6), max_size=4),
    noise=st.binary(max_size=64),
    out_mode=st.sampled_from(["L", "RGB"]),
)
def test_any_image_file_gives_an_array_or_a_data_error(
    tmp_path, mode, width, height, cut, flips, noise, out_mode
):
    data = bytearray(_png(mode, (width, height)))
    data = data[: round(cut * len(data))] if cut < 0.3 else data
    for flip in flips:
        if data:
            data[flip % len(data)] ^= 1 + flip % 255
    path = tmp_path / "image.png"
    path.write_bytes(bytes(data) + noise)
    try:
        array = decode_image(path, 5, out_mode)
    except DataError as error:
        assert "image.png" in str(error)
    else:
        assert array.dtype == np.uint8 and array.shape[:2] == (5, 5)


# ------------------------------------------------------------------- checkpoints


def _checkpoint(path: Path) -> None:
    save_checkpoint(
        path,
        {
            "config": {"dataset": "sinusoid"},
            "iteration": 3,
            "params": {"w": torch.ones(3)},
            "optimizer": {},
            "generator": torch.Generator().get_state(),
            "best": {},
        },
    )


def _torch_file(contents) -> bytes:
    stream = io.BytesIO()
    torch.save(contents, stream)
    return stream.getvalue()


class _Foreign:
    def __init__(self):
        self.value = 1


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (lambda good: b"", r"found an empty file \(0 bytes\)"),
        (lambda good: b"step,loss\n1,0.5\n", r"found a text file of 16 bytes starting 'step,loss'"),
        (lambda good: good[: len(good) // 2], r"found a truncated or damaged zip archive"),
        (lambda good: good[:-30], r"found a truncated or damaged zip archive"),
        (lambda good: os.urandom(300), r"found 300 bytes of binary data"),
        (lambda good: pickle.dumps({"a": 1}), r"found a pickle or legacy torch file"),
        (
            lambda good: _torch_file({"state_dict": {"w": torch.ones(1)}}),
            r"found a torch file holding a dict with keys \[state_dict\] \(another program's",
        ),
        (lambda good: _torch_file([torch.ones(1)]), r"found a torch file holding a list"),
        (
            lambda good: _torch_file(_Foreign()),
            r"found a torch file that holds Python objects .*could run code",
        ),
        (
            lambda good: _torch_file({"format": "fmaml-checkpoint", "version": 7}),
            r"format version 7, written by a newer fmaml; this fmaml reads version 1\. "
            r"Upgrade fmaml",
        ),
        (
            lambda good: _torch_file({"format": "fmaml-checkpoint", "version": 1, "params": {}}),
            r"a damaged fmaml checkpoint: its 'config' should be a dict, found nothing",
        ),
    ],
)
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, make, found):
    _checkpoint(tmp_path / "good.pt")
    path = tmp_path / "bad.pt"
    path.write_bytes(make((tmp_path / "good.pt").read_bytes()))
    with pytest.raises(
        CheckpointError, match=r"bad\.pt (is not an|is a damaged|is an) fmaml"
    ) as raised:
        load_checkpoint(path)
    assert re.search(found, str(raised.value)), str(raised.value)
    for word in ("KeyError", "UnpicklingError", "Traceback"):
        assert word not in str(raised.value)


def test_test_on_a_text_file_says_what_it_found(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not a checkpoint\n")
    result = invoke("test", "--checkpoint", text)
    assert result.exit_code == 1
    assert "notes.pt is not an fmaml checkpoint: found a text file of 37 bytes" in result.output
    for word in ("KeyError", "UnpicklingError", "Traceback"):
        assert word not in result.output


@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.integers(0, 10**7), max_size=12))
def test_damaged_checkpoints_give_the_checkpoint_or_a_checkpoint_error(tmp_path, cut, flips):
    path = tmp_path / "ck.pt"
    _checkpoint(path)
    data = bytearray(path.read_bytes())
    data = data[: round(cut * len(data))] if cut < 0.5 else data
    for flip in flips:
        if data:
            data[flip % len(data)] ^= 1 + flip % 255
    path.write_bytes(bytes(data))
    try:
        contents = load_checkpoint(path)
    except CheckpointError as error:
        assert "ck.pt" in str(error)
    else:
        assert contents["format"] == "fmaml-checkpoint" and isinstance(contents["params"], dict)


@FUZZ
@given(data=st.binary(max_size=300), zipped=st.booleans())
def test_any_bytes_as_a_checkpoint_give_a_checkpoint_error(tmp_path, data, zipped):
    path = tmp_path / "any.pt"
    if zipped:  # bytes inside a zip archive laid out as torch.save's
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", b"\x80\x02" + data)
            archive.writestr("archive/version", b"3\n")
    else:
        path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"any\.pt"):
        load_checkpoint(path)


def test_a_torchscript_archive_is_not_handed_to_torch_jit(tmp_path):
    """torch.load passes an archive with constants.pkl (TorchScript) to torch.jit.load."""
    path = tmp_path / "script.pt"
    _checkpoint(path)
    with zipfile.ZipFile(path, "a") as archive:
        prefix = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{prefix}/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr(f"{prefix}/code/__torch__.py", "def forward(self): ...\n")
    with pytest.raises(CheckpointError, match=r"script\.pt is not an fmaml checkpoint"):
        load_checkpoint(path)


# ---------------------------------------------------------- the user's data folders


def _train_on(data: Path, out: Path) -> None:
    result = invoke(
        "train",
        "--data-root",
        data,
        "--split",
        "alphabet:0.75,0,0.25",
        "--meta-batch",
        "2",
        "--hidden",
        "8",
        "--iterations",
        "2",
        "--val-episodes",
        "2",
        "--no-download",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    result = invoke("test", "--checkpoint", out, "--episodes", "4")
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.skipif(not OMNIGLOT_SUBSET.is_dir(), reason="needs ../shared/data/omniglot")
@pytest.mark.parametrize("writable", [True, False], ids=["writable", "read-only"])
def test_training_leaves_a_copy_of_the_omniglot_subset_byte_for_byte_unchanged(
    tmp_path, isolated_cache, writable
):
    data = tmp_path / "omniglot"
    shutil.copytree(OMNIGLOT_SUBSET, data)
    if not writable:
        for folder in [data, *[p for p in data.rglob("*") if p.is_dir()]]:
            folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        before = snapshot(data)
        _train_on(data, tmp_path / "run")
        assert snapshot(data) == before
        assert len(list(isolated_cache.glob("omniglot-*.npz"))) == 1
    finally:
        for folder in [data, *[p for p in data.rglob("*") if p.is_dir()]]:
            folder.chmod(0o755)


@pytest.mark.slow
@pytest.mark.skipif(not OMNIGLOT_SUBSET.is_dir(), reason="needs ../shared/data/omniglot")
def test_the_real_data_tests_pass_on_writable_and_read_only_data(tmp_path):
    """The real-data tests, run against a writable copy of the subset and a copy whose folders
    allow no writing, pass alike (as on machines where ../shared/data is either)."""
    for writable in (True, False):
        data = tmp_path / ("writable" if writable else "read-only") / "omniglot"
        shutil.copytree(OMNIGLOT_SUBSET, data)
        folders = [data, *[p for p in data.rglob("*") if p.is_dir()]]
        for folder in folders if not writable else []:
            folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "tests/test_omniglot.py", "-k", "shared_omniglot_subset"],
                cwd=ROOT, capture_output=True, text=True, timeout=600,
                env={**os.environ, "FMAML_TEST_OMNIGLOT": str(data)},
            )  # fmt: skip
        finally:
            for folder in folders:
                folder.chmod(0o755)
        assert done.returncode == 0, done.stdout[-2000:]
        assert "1 passed" in done.stdout


def test_a_folder_dataset_is_left_unchanged_and_cached_elsewhere(tmp_path, isolated_cache):
    make_folder(tmp_path / "images", {f"c{i}": 4 for i in range(6)})
    before = snapshot(tmp_path / "images")
    args = folder_train_args(tmp_path / "images", "0.67,0,0.33")
    result = invoke(*args, "--iterations", "2", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path / "images") == before
    assert len(list(isolated_cache.glob("folder-*.npz"))) == 1
