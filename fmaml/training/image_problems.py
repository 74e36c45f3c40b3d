"""Few-shot image classification problems: Omniglot, mini-ImageNet, CIFAR-FS, FC100,
tiered-ImageNet, CUB and class folders."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from fmaml.errors import ConfigError
from fmaml.tasks.datasets import DOWNLOADABLE, load_splits
from fmaml.tasks.images import EpisodeSampler, fixed_episodes
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
    splits = load_splits(
        config.dataset,
        data_root(config),
        split=config.split,
        image_size=config.image_size,
        channels=channels if config.dataset == "folder" else None,
        download=config.dataset in DOWNLOADABLE and bool(config.extra.get("download", False)),
        verify=bool(config.extra.get("verify", True)),
        seed=config.split_seed,
    )
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
