"""Tiny generated copies of the published CIFAR-100, tiered-ImageNet and CUB layouts.

Not a conftest: import what you need, ``from conftest_datasets import ...``. Same file names,
pickle structure (Python 2 pickles for CIFAR-100 and tiered-ImageNet), dtypes and shapes as
the real files; a few images per class.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from fmaml.tasks.published import published_split

SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
"""CIFAR-100's 20 superclasses and their 5 classes each (``meta``'s names)."""

FINE_NAMES = sorted(name for names in SUPERCLASSES.values() for name in names)
COARSE_NAMES = sorted(SUPERCLASSES)


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 wrote its ``str`` (BINSTRING), so files read as Python 2's."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str


def python2_pickle(value: object, path: Path) -> None:
    """Write ``value`` as Python 2's cPickle (protocol 2) would: byte strings as ``str``."""
    with open(path, "wb") as stream:
        _Python2Pickler(stream, protocol=2).dump(value)


class CreatesAFile:
    """Unpickled by ``pickle.load``, this calls ``open(target, "w")``: the file appears."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def cifar_pixel(fine: int, index: int) -> int:
    """The value every pixel of image ``index`` of class ``fine`` holds."""
    return (fine * 2 + index * 37) % 256


def make_cifar100(folder: Path, *, per_class: tuple[int, int] = (2, 1), python2=True) -> Path:
    """Write ``folder/cifar-100-python/{train,test,meta}``; returns that folder.

    ``train`` holds ``per_class[0]`` images per class, ``test`` ``per_class[1]``; every pixel
    of an image is :func:`cifar_pixel` of its class and its row in the file.
    """
    out = folder / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    coarse_of = {fine: COARSE_NAMES.index(c) for c, names in SUPERCLASSES.items() for fine in [
        FINE_NAMES.index(n) for n in names
    ]}  # fmt: skip
    write = python2_pickle if python2 else (lambda v, p: p.write_bytes(pickle.dumps(v, 4)))
    for name, count in (("train", per_class[0]), ("test", per_class[1])):
        fine = np.repeat(np.arange(100), count)[::-1].copy()  # not sorted: the loader groups
        data = np.stack([np.full(3072, cifar_pixel(f, i), np.uint8) for i, f in enumerate(fine)])
        write(
            {
                b"filenames": [f"img_{i}.png".encode() for i in range(len(fine))],
                b"batch_label": f"{name}ing batch 1 of 1".encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": [coarse_of[f] for f in fine.tolist()],
                b"data": data,
            },
            out / name,
        )
    write(
        {
            b"fine_label_names": [n.encode() for n in FINE_NAMES],
            b"coarse_label_names": [n.encode() for n in COARSE_NAMES],
        },
        out / "meta",
    )
    return out


def make_tar(source: Path, name: str, archive: Path) -> Path:
    """``archive`` (gzip tar) holding ``source/name`` as ``name/...``; returns ``archive``."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as packed:
        packed.add(source / name, arcname=name)
    return archive


def png_bytes(colour: tuple[int, int, int], side: int = 84) -> np.ndarray:
    """A solid-colour PNG, as the release stores it: a uint8 array of the file's bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


TIERED_SIZES = {"train": (20, 351), "val": (6, 97), "test": (8, 160)}
"""Categories and classes per split in the release."""


def tiered_colour(split: str, label: int) -> tuple[int, int, int]:
    return ("train", "val", "test").index(split) * 80 + 10, label % 256, (label * 7) % 256


def make_tiered(
    root: Path, *, layout: str = "png", sizes=None, per_class: int = 1, side: int = 84
) -> dict[str, list[str]]:
    """Write ``{split}_labels.pkl`` and ``{split}_images_png.pkl`` (or ``_images.npz``).

    ``sizes``: ``{split: (categories, classes)}``, default the release's. Class names are
    ``n<split><label>``, made unique across splits; returns them per split.
    """
    root.mkdir(parents=True, exist_ok=True)
    names = {}
    for s, (categories, classes) in (sizes or TIERED_SIZES).items():
        labels = np.repeat(np.arange(classes), per_class)[::-1].copy()
        general = labels % categories
        specific = [f"n{('train', 'val', 'test').index(s)}{c:07d}" for c in range(classes)]
        python2_pickle(
            {
                b"label_specific": labels,
                b"label_general": general,
                b"label_specific_str": [n.encode() for n in specific],
                b"label_general_str": [f"n9{s}{g:05d}".encode() for g in range(categories)],
            },
            root / f"{s}_labels.pkl",
        )
        if layout == "png":
            pngs = [png_bytes(tiered_colour(s, int(c)), side) for c in labels]
            python2_pickle(pngs, root / f"{s}_images_png.pkl")
        else:
            images = np.stack(
                [np.full((side, side, 3), tiered_colour(s, int(c)), np.uint8) for c in labels]
            )
            np.savez(root / f"{s}_images.npz", images=images)
        names[s] = specific
    return names


def cub_colour(index: int) -> tuple[int, int, int]:
    return (index * 5) % 256, (index * 11) % 256, 200


def make_cub(folder: Path, *, per_class: int = 2) -> Path:
    """Write ``folder/CUB_200_2011/images/<class>/*.jpg`` (and ``classes.txt``): 200 classes
    of ``per_class`` small JPEGs, a solid colour per class; returns ``folder/CUB_200_2011``."""
    out = folder / "CUB_200_2011"
    classes = sorted(name for names in published_split("cub").values() for name in names)
    for k, name in enumerate(classes):
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = out / "images" / name / f"{name.split('.')[1]}_{i:04d}_{k}.jpg"
            Image.new("RGB", (12, 10), cub_colour(k)).save(path, quality=95)
    lines = [f"{k + 1} {name}" for k, name in enumerate(classes)]
    (out / "classes.txt").write_text("\n".join(lines) + "\n")
    return out
