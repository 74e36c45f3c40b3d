"""Training configuration and the published defaults behind it (``shared/PROTOCOLS.md``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DATASETS = ("sinusoid", "omniglot", "miniimagenet", "folder")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a meta-training run; saved in every checkpoint.

    Fields left ``None`` are filled by :func:`resolve` with the MAML paper's setting for the
    dataset and number of ways.
    """

    dataset: str = "sinusoid"
    data_root: str | None = None
    split: str | None = None
    algorithm: str = "maml"
    ways: int | None = None
    shots: int | None = None
    query: int | None = None
    meta_batch: int | None = None
    inner_steps: int | None = None
    eval_inner_steps: int | None = None
    inner_lr: float | None = None
    outer_lr: float = 1e-3
    grad_clip: float | None = None
    iterations: int | None = None
    seed: int = 0
    hidden: int | None = None
    image_size: int | None = None
    val_every: int = 500
    val_episodes: int = 100
    checkpoint_every: int = 500
    log_every: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"TrainConfig.from_dict(): unknown fields {unknown}; known: {sorted(known)}. "
                "The checkpoint may come from a newer fmaml."
            )
        return cls(**values)


# The MAML paper's settings (Finn et al. 2017 and the authors' code), per dataset and ways.
PAPER_DEFAULTS: dict[tuple[str, int | None], dict[str, Any]] = {
    ("sinusoid", None): dict(
        ways=1,
        shots=10,
        query=10,
        meta_batch=25,
        inner_steps=1,
        eval_inner_steps=10,
        inner_lr=0.01,
        iterations=70_000,
        hidden=40,
    ),
    ("omniglot", 5): dict(
        shots=1,
        meta_batch=32,
        inner_steps=1,
        eval_inner_steps=3,
        inner_lr=0.4,
        iterations=60_000,
        hidden=64,
        image_size=28,
    ),
    ("omniglot", 20): dict(
        shots=1,
        meta_batch=16,
        inner_steps=5,
        eval_inner_steps=5,
        inner_lr=0.1,
        iterations=60_000,
        hidden=64,
        image_size=28,
    ),
    ("miniimagenet", 5): dict(
        shots=1,
        query=15,
        meta_batch=4,
        inner_steps=5,
        eval_inner_steps=10,
        inner_lr=0.01,
        iterations=60_000,
        hidden=32,
        image_size=84,
        grad_clip=10.0,
    ),
    ("folder", 5): dict(
        shots=1,
        query=15,
        meta_batch=4,
        inner_steps=5,
        eval_inner_steps=10,
        inner_lr=0.01,
        iterations=60_000,
        hidden=32,
        image_size=84,
    ),
}


def paper_defaults(dataset: str, ways: int | None) -> dict[str, Any]:
    """The MAML paper's setting for ``dataset`` with ``ways`` classes (5 if ``None``)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}.")
    if dataset == "sinusoid":
        return dict(PAPER_DEFAULTS[("sinusoid", None)])
    ways = 5 if ways is None else ways
    key = (dataset, 20 if dataset == "omniglot" and ways >= 20 else 5)
    return {"ways": ways, **PAPER_DEFAULTS[key]}


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill every ``None`` field from :func:`paper_defaults`; check the values.

    The query size defaults to ``shots`` (the MAML paper's protocol) where the paper gives
    none.

    Raises:
        ValueError: for a non-positive size, rate or iteration count, naming the option.
    """
    defaults = paper_defaults(config.dataset, config.ways)
    values = config.to_dict()
    for key, value in defaults.items():
        if values.get(key) is None:
            values[key] = value
    if values["query"] is None:
        values["query"] = values["shots"]
    if values["eval_inner_steps"] is None:
        values["eval_inner_steps"] = values["inner_steps"]
    resolved = TrainConfig(**values)
    check(resolved)
    return resolved


def check(config: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first option whose value cannot work."""
    positive_ints = (
        "ways",
        "shots",
        "query",
        "meta_batch",
        "inner_steps",
        "eval_inner_steps",
        "iterations",
        "val_every",
        "val_episodes",
        "checkpoint_every",
        "log_every",
    )
    for name in positive_ints:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be a positive integer, got {value!r}."
            )
    for name in ("inner_lr", "outer_lr"):
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value!r}.")
    if config.dataset != "sinusoid" and config.ways < 2:
        raise ValueError(f"--ways must be at least 2 for classification, got {config.ways}.")
