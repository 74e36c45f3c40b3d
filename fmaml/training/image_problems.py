"""Few-shot image classification problems: Omniglot, mini-ImageNet, CIFAR-FS, FC100,
tiered-ImageNet, CUB and class folders."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from fmaml.errors import ConfigError
from fmaml.tasks.datasets import DOWNLOADABLE, load_splits
from fmaml.tasks.images import DataError, EmptySplitData, EpisodeSampler, fixed_episodes
from fmaml.training.config import TrainConfig
from fmaml.training.problems import (
    EmptySplit,
    Problem,
    classification_problem,
    dtype_of,
    image_model,
)
from fmaml.types import Task

DEFAULT_ROOTS = {
    "omniglot": "data/omniglot",
    "miniimagenet": "data/miniimagenet",
    "cifarfs": "data/cifar100",
    "fc100": "data/cifar100",
    "tieredimagenet": "data/tieredimagenet",
    "cub": "data/cub",
}
"""Where ``--data-root`` points when it is not given."""

CHANNELS = {"omniglot": 1, "folder": 3}
"""Image channels per dataset where they are not 3 (RGB)."""


def data_root(config: TrainConfig) -> Path:
    """The run's data folder: ``--data-root``, else the dataset's default under ``./data``."""
    if config.data_root is not None:
        return Path(config.data_root)
    if config.dataset not in DEFAULT_ROOTS:
        raise ConfigError(
            f"--data-root is required for --dataset {config.dataset}: pass the folder that "
            "holds one sub-folder of images per class."
        )
    return Path(DEFAULT_ROOTS[config.dataset])


OMNIGLOT_LAYOUT = (
    "<alphabet>/<character>/<image>.png, or the official images_background/ and "
    "images_evaluation/ from https://github.com/brendenlake/omniglot"
)


def downloads(config: TrainConfig, root: Path) -> bool:
    """Whether the run downloads its data (Omniglot into ``root``; the CIFAR-100 and CUB
    archives into fmaml's cache): with ``--download``, or for the default folder (no
    ``--data-root``) unless ``--no-download``. fmaml creates a data folder only to
    download into it: a missing folder it won't download into is an error, and nothing is made.

    ``config.extra["download"]`` holds the flag: ``True`` (``--download``), ``False``
    (``--no-download``) or ``None`` (neither).

    Raises:
        ConfigError: ``--download`` for a dataset other than Omniglot.
        DataError: ``root`` does not exist and won't be downloaded into; names it.
    """
    asked = config.extra.get("download")
    if asked and config.dataset not in DOWNLOADABLE:
        raise ConfigError(
            f"--download fetches {', '.join(DOWNLOADABLE)} only; {config.dataset} can't be "
            f"downloaded automatically. Put it in {str(root)!r} by hand (see the docs' Data "
            "page) and drop --download."
        )
    download = config.dataset in DOWNLOADABLE and (
        asked is True or (asked is None and config.data_root is None)
    )
    if download or root.is_dir() or config.dataset != "omniglot":
        return download  # the other loaders name a missing folder themselves, creating nothing
    if asked is False:
        fix = (
            "drop --no-download to fetch it there"
            if config.data_root is None
            else "replace --no-download with --download to fetch it into that folder"
        )
        raise DataError(
            f"the Omniglot folder {str(root)!r} does not exist and --no-download was given; "
            f"nothing was created. Put Omniglot there ({OMNIGLOT_LAYOUT}), point --data-root "
            f"at the folder that holds it, or {fix}."
        )
    raise DataError(
        f"--data-root {str(root)!r} does not exist; nothing was created. Point --data-root at "
        f"the folder that holds Omniglot ({OMNIGLOT_LAYOUT}), or add --download to fetch the "
        "official archives into it."
    )


def too_few_classes(config: TrainConfig, root: Path, counts: dict[str, int], unit: str) -> str:
    """The message for splits that can't serve ``config.ways``-way tasks: what each split
    needs, what it has (``counts`` of ``unit``: ``"classes"``, or ``"groups"`` = Omniglot's
    alphabets, of which a split needs one at least) and the fix."""
    ways = config.ways
    rule = f"--split {config.split}" if config.split else "the default --split"
    used = [name for name, count in counts.items() if name != "val" or count > 0]
    least = ways if unit == "classes" else 1
    short = [name for name in used if counts[name] < least]
    fixes = [
        f"Use data with more classes (at least {ways} in each of {_and(used)})"
        if unit == "classes"
        else "Use data with more alphabets"
    ]
    if unit != "classes" or counts[short[0]] == 0:
        fixes.append(f"give {_and(short)} a larger share with --split")
    fewest = min(counts[name] for name in used)
    if unit == "classes" and 2 <= fewest < ways:
        fixes.append(f"lower --ways to {fewest}")
    unit = "alphabets" if unit == "groups" and config.dataset == "omniglot" else unit
    return (
        f"{ways}-way tasks need at least {ways} classes in every split they are drawn from "
        f"(train, test, and val when --split gives it a share), but {rule} of the data in "
        f"{str(root)!r} gives {', '.join(f'{n} {c}' for n, c in counts.items())} {unit}: "
        f"too few in {_and(short)}. {'; or '.join(fixes)}."
    )


def _and(names: list[str]) -> str:
    """``"train, val and test"``."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def image_problem(config: TrainConfig, *, check_train: bool = True) -> Problem:
    """The :class:`~fmaml.training.problems.Problem` of an image config: data, conv4 and samplers.

    The images stay uint8 on ``config.device``; every meta-batch is drawn there at once. Omniglot
    classes are rotated by a random multiple of 90 degrees per task (MAML protocol); with
    ``config.within_alphabet`` the classes of each task come from one alphabet (alphabets with
    fewer than ``ways`` characters are skipped; ``problem.protocol(split)`` lists them).

    Args:
        config: the run's settings.
        check_train: build the training sampler now, so that a training split that can't
            serve the tasks fails here; ``False``: on the first training meta-batch.

    Raises:
        DataError: the data is missing or cannot serve ``ways``-way ``shots + query`` tasks.
    """
    channels = CHANNELS.get(config.dataset, 3)
    root = data_root(config)
    try:
        splits = load_splits(
            config.dataset,
            root,
            split=config.split,
            image_size=config.image_size,
            channels=channels if config.dataset == "folder" else None,
            download=downloads(config, root),
            verify=bool(config.extra.get("verify", True)),
            seed=config.split_seed,
        )
    except EmptySplitData as error:  # said again with the ways that the splits must serve
        raise DataError(too_few_classes(config, root, error.counts, error.unit)) from error
    if check_train:  # every split a run draws tasks from; a test of fewer ways may skip this
        counts = {name: part.num_classes for name, part in splits.items()}
        if min(counts.values()) < config.ways:
            raise DataError(too_few_classes(config, root, counts, "classes"))
    device, dtype = torch.device(config.device), dtype_of(config)
    rotate = config.dataset == "omniglot"
    samplers: dict[str, EpisodeSampler] = {}

    def sampler(split: str) -> EpisodeSampler:
        if split not in splits:
            raise EmptySplit(split, tuple(splits), config.split)
        if split not in samplers:
            samplers[split] = EpisodeSampler(
                splits[split].to(device),
                config.ways,
                config.shots,
                config.query,
                rotate=rotate,
                dtype=dtype,
                within_groups=config.within_alphabet,
            )
        return samplers[split]

    def protocol(split: str) -> dict:
        if config.dataset != "omniglot":
            return {"protocol": "random-classes"}
        if not config.within_alphabet:
            return {"protocol": "across-alphabets"}
        source = sampler(split)
        return {
            "protocol": "within-alphabet",
            "alphabets": dict(source.groups),
            "skipped_alphabets": dict(source.skipped_groups),
        }

    if check_train:
        sampler("train")

    def sample(num_tasks: int, generator: torch.Generator, shard=None) -> Task:
        train_sampler = sampler("train")
        spec = train_sampler.describe(num_tasks, generator)  # all of it: the same draws
        return train_sampler.gather(spec if shard is None else spec.slice(*shard))

    def episodes(
        split: str, num_episodes: int, seed: int, chunk: int, shard=None
    ) -> Iterator[Task]:
        source = sampler(split)
        spec = fixed_episodes(source, num_episodes, seed)
        first, stop = (0, num_episodes) if shard is None else shard
        for start in range(first, stop, chunk):
            yield source.gather(spec.slice(start, min(start + chunk, stop)))

    model = image_model(config, in_channels=channels)
    problem = classification_problem(model, config.shots, sample, episodes, config.loss_reduction)
    data = describe_splits(splits, config)
    if config.within_alphabet and "train" in samplers:
        skipped = samplers["train"].skipped_groups
        data += f"; tasks within one alphabet ({config.ways}-way), " + (
            "skipping training alphabets of fewer characters: "
            + ", ".join(f"{name} ({count})" for name, count in skipped.items())
            if skipped
            else "no training alphabet skipped"
        )
    return dataclasses.replace(problem, data=data, protocol=protocol, splits=tuple(splits))


def describe_splits(splits: dict, config: TrainConfig) -> str:
    """``"classes: train 178 (6 alphabets), test 64 (Early_Aramaic, Sanskrit); ..."``."""
    parts = []
    for name, part in splits.items():
        groups = sorted({str(g) for g in part.groups or () if g is not None})
        if not groups:
            parts.append(f"{name} {part.num_classes}")
        elif len(groups) <= 3:
            parts.append(f"{name} {part.num_classes} ({', '.join(groups)})")
        else:
            word = "alphabets" if config.dataset == "omniglot" else "groups"
            parts.append(f"{name} {part.num_classes} ({len(groups)} {word})")
    rule = config.split or "default"
    return f"classes: {', '.join(parts)}; split {rule}, split seed {config.split_seed}"
