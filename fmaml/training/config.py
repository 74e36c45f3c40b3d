"""Training configuration and the published defaults behind it (``shared/PROTOCOLS.md``)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fmaml.algorithms import ALGORITHMS
from fmaml.errors import ConfigError

DATASETS = (
    "sinusoid",
    "omniglot",
    "miniimagenet",
    "folder",
    "cifarfs",
    "fc100",
    "tieredimagenet",
    "cub",
)
PRECISIONS = ("float32", "bf16")
"""``--precision``: full float32, or bf16 mixed precision
(:meth:`fmaml.SupervisedLoss.with_autocast`)."""
MODELS = ("conv4", "resnet12")
"""Image networks ``--model`` takes (:mod:`fmaml.nn`)."""


def option(
    default: Any = None,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    **cli: Any,
) -> Any:
    """A :class:`TrainConfig` field and what its command-line option needs.

    ``python cli.py train`` has one option per field, built from this metadata
    (``fmaml.training.cli.config_options``), so a new setting is one field here.

    Args:
        default: the field's default.
        help: the option's help text.
        factory: a default factory instead of ``default`` (dicts).
        **cli: ``choices`` (a tuple, or ``"algorithms"``, ``"presets"``,
            ``"inner_optimizers"``: lists the CLI looks up), ``flag`` (the option's
            declaration, e.g. ``"--max-pool/--stride"``), ``cli_default`` (the command line's
            default, where it differs), ``path`` (a folder), ``pairs`` (a dict given as
            repeated ``NAME=VALUE``), ``cli=False`` (no option: set another way).

    Returns:
        A ``dataclasses.field``.
    """
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a meta-training run; saved in every checkpoint.

    Fields left ``None`` are filled by :func:`resolve` with the MAML paper's setting for the
    dataset and number of ways.
    """

    dataset: str = option("sinusoid", "The data.", choices=DATASETS, cli_default="omniglot")
    data_root: str | None = option(
        None, "Image folder (omniglot default: ./data/omniglot).", path=True
    )
    split: str | None = option(None, "How classes are split (see README, Data).")
    preset: str | None = option(
        None,
        "Start from a named configuration (README, 'Named configurations'); options given "
        "beside it replace its settings.",
        choices="presets",
    )
    algorithm: str = option("maml", "The algorithm (fmaml.algorithms).", choices="algorithms")
    ways: int | None = option(None, "Classes per task [5].")
    shots: int | None = option(None, "Support examples per class [paper].")
    query: int | None = option(
        None, "Query examples per class [paper: = shots; 15 for mini-ImageNet]."
    )
    meta_batch: int | None = option(None, "Tasks per outer step [paper].")
    inner_steps: int | None = option(None, "Inner steps in training [paper].")
    eval_inner_steps: int | None = option(None, "Inner steps at validation and test [paper].")
    inner_lr: float | None = option(None, "Inner learning rate [paper].")
    # The inner loop's optimiser (fmaml.inner_optim): "sgd" (MAML's), "momentum" or "adam";
    # its hyper-parameters, e.g. {"beta": 0.5} ({}: the optimiser's defaults); and whether the
    # betas are meta-learned (as sigmoid(logit), from the values set; eps is never learned).
    inner_optimizer: str = option(
        "sgd",
        "The inner loop's optimiser, at --inner-lr (sgd: MAML's; fmaml.inner_optim).",
        choices="inner_optimizers",
    )
    inner_hyper: dict[str, float] = option(
        factory=dict,
        help="A hyper-parameter of the inner optimiser (momentum: beta; adam: beta1, beta2, "
        "eps), e.g. --inner-hyper beta=0.5; repeat for more [the optimiser's defaults].",
        pairs=True,
    )
    learn_inner_hyper: bool = option(
        False, "Meta-learn the inner optimiser's betas (as sigmoid(logit), from their set values)."
    )
    outer_lr: float = option(1e-3, "Adam rate.")
    grad_clip: float | None = option(None, "Clip meta-gradients to [-c, c] [mini-ImageNet: 10].")
    iterations: int | None = option(
        None, "Outer steps in total [paper]; with --resume, the new total."
    )
    seed: int = option(0, "Initial weights and training tasks.")
    # Seeds the shuffle of proportional (and MAML's) splits. Apart from ``seed`` so that runs
    # with different seeds train and test on the same classes.
    split_seed: int = option(
        0, "Shuffles proportional splits; keep it fixed to compare seeds on the same test classes."
    )
    within_alphabet: bool = option(
        False,
        "Omniglot: draw all classes of a task from one alphabet (Lake et al.'s harder "
        "protocol; alphabets with fewer characters than --ways are skipped), for training, "
        "validation and test.",
    )
    model: str = option(
        "conv4",
        "Image network: the MAML paper's conv4, or MetaOptNet's ResNet-12 (its first block "
        "--hidden wide, then 2.5x, 5x, 10x; default 64).",
        choices=MODELS,
    )
    hidden: int | None = option(None, "Filters / hidden units [paper].")
    max_pool: bool | None = option(
        None,
        "conv4 downsamples with 2x2 max-pools or with stride-2 convolutions [paper: stride "
        "for images of 28 pixels or less, max-pool above].",
        flag="--max-pool/--stride",
    )
    image_size: int | None = option(
        None, "Images are resized to this square size [omniglot 28, else 84]."
    )
    val_every: int = option(500, "Validate every this many iterations.")
    val_episodes: int = option(100, "Validation episodes (fixed).")
    keep_best: bool | None = option(
        None,
        "Write best.pt, the best validation checkpoint, which `test RUN` then evaluates "
        "[images: yes; sinusoid: no, the final model latest.pt is tested, as in the paper].",
    )
    checkpoint_every: int = option(500, "Write latest.pt every this many iterations.")
    log_every: int = option(10, "Write a metrics.jsonl row every this many iterations.")
    device: str = option("cpu", "Where to train: cpu, cuda, cuda:1, ...")
    dtype: str = option("float32", "Parameters and data.", choices=("float32", "float64"))
    # "bf16": mixed precision, the model's forward pass under torch.autocast in bfloat16 with
    # float32 parameters, meta-gradients and Adam state (SupervisedLoss.with_autocast);
    # "float32": none. Needs --dtype float32.
    precision: str = option(
        "float32",
        "bf16: mixed precision (forward pass in bfloat16 under autocast; float32 parameters, "
        "meta-gradients and Adam state; --dtype float32 only).",
        choices=("float32", "bf16"),
    )
    lslr: bool | None = option(
        None, "MAML++ LSLR: a learned rate per tensor and step [mamlpp: on]."
    )
    msl_epochs: int | None = option(
        None, "MAML++ multi-step loss for this many epochs, 0 = off [mamlpp: 10/15]."
    )
    da_epochs: int | None = option(
        None, "MAML++ derivative-order annealing: first-order epochs, 0 = off [mamlpp: 50]."
    )
    per_step_bn: bool | None = option(
        None, "MAML++ BNWB: BatchNorm weights and biases per step [mamlpp: on]."
    )
    bn_statistics: str | None = option(
        None,
        "Query BatchNorm statistics: the batch itself (MAML, transductive) or the "
        "task's support set at the same step (MAML++ BNRS, leak-free) [mamlpp: support].",
        choices=("batch", "support"),
    )
    cosine_annealing: bool | None = option(
        None, "MAML++ CA: cosine-anneal the outer rate to --min-outer-lr [mamlpp: on]."
    )
    min_outer_lr: float = option(1e-5, "The outer rate cosine annealing ends at.")
    iterations_per_epoch: int = option(500, "Epoch length for the MAML++ schedules.")
    loss_reduction: str | None = option(
        None,
        "Cross-entropy summed over a set and divided by the shots (the MAML authors') or "
        "the mean (MAML++) [mamlpp: mean; else sum_per_shot].",
        choices=("sum_per_shot", "mean"),
    )
    # iMAML (--algorithm imaml): the inner problem's pull lam/2 ||adapted - params||^2 and the
    # conjugate-gradient iterations of the implicit meta-gradient; None: IMAML_DEFAULTS for
    # imaml, unset for every other algorithm.
    imaml_lam: float | None = option(
        None, "iMAML: lam of the inner problem's pull lam/2 ||adapted - params||^2 [imaml: 1.0]."
    )
    cg_steps: int | None = option(
        None, "iMAML: conjugate-gradient iterations of the implicit meta-gradient [imaml: 5]."
    )
    memory_budget: str | None = option(
        None,
        "Memory one meta-step may use, e.g. 6GB or 500MB: the fastest strategy whose "
        "estimated peak fits it (fmaml.plan_memory) [CUDA: free memory less 10%; CPU: none].",
    )
    # How meta-batches run (never what they compute): fields of fmaml.Strategy that replace
    # fmaml.auto_strategy's choice for the device and model, e.g. {"chunk_size": 8}. Set on
    # the command line by --chunk-size, --workers, --recompute-steps and --compile.
    strategy: dict[str, Any] = option(factory=dict, cli=False)
    extra: dict[str, Any] = option(factory=dict, cli=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"TrainConfig.from_dict(): unknown fields {unknown}; known: {sorted(known)}. "
                "The checkpoint may come from a newer fmaml."
            )
        if "split_seed" not in values:  # saved before split_seed: the run's seed split the data
            values = {**values, "split_seed": values.get("seed", 0)}
        if "keep_best" not in values:  # saved before keep_best: every run kept best.pt
            values = {**values, "keep_best": True}
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
# The benchmarks that followed (docs/data.md) ran MAML with its mini-ImageNet setting: conv4 of
# 32 filters, 5-way 1-shot (or 5-shot), 15 query, 5 steps at 0.01 (10 at test), meta-batch 4;
# CIFAR-FS and FC100 at their own 32x32, tiered-ImageNet and CUB at 84x84.
PAPER_DEFAULTS.update(
    {
        (dataset, 5): {**PAPER_DEFAULTS[("miniimagenet", 5)], "image_size": size}
        for dataset, size in (("cifarfs", 32), ("fc100", 32), ("tieredimagenet", 84), ("cub", 84))
    }
)


# MAML++'s released configurations (antreasantoniou/HowToTrainYourMAMLPytorch), where they
# differ from MAML's: Omniglot meta-batch 8, 5 steps, LSLR from 0.1; mini-ImageNet meta-batch 2,
# 48 filters, LSLR from 0.01, 15 query; 100 epochs x 500 iterations; mean cross-entropy.
MAMLPP_DEFAULTS: dict[str, dict[str, Any]] = {
    "omniglot": dict(
        meta_batch=8,
        inner_steps=5,
        eval_inner_steps=5,
        inner_lr=0.1,
        iterations=50_000,
        msl_epochs=10,
    ),
    "miniimagenet": dict(
        meta_batch=2,
        inner_steps=5,
        eval_inner_steps=5,
        inner_lr=0.01,
        iterations=50_000,
        hidden=48,
        query=15,
        msl_epochs=15,
        grad_clip=None,
    ),
    "folder": dict(
        meta_batch=2,
        inner_steps=5,
        eval_inner_steps=5,
        inner_lr=0.01,
        iterations=50_000,
        hidden=48,
        query=15,
        msl_epochs=15,
    ),
    "sinusoid": dict(inner_steps=5, eval_inner_steps=10, msl_epochs=10),
}
MAMLPP_DEFAULTS.update(  # the new benchmarks as mini-ImageNet
    {
        dataset: dict(MAMLPP_DEFAULTS["miniimagenet"])
        for dataset in ("cifarfs", "fc100", "tieredimagenet", "cub")
    }
)
MAMLPP_FIXES = dict(
    lslr=True,
    da_epochs=50,
    per_step_bn=True,
    bn_statistics="support",
    cosine_annealing=True,
    loss_reduction="mean",
)
PLAIN_FIXES = dict(
    lslr=False,
    msl_epochs=0,
    da_epochs=0,
    per_step_bn=False,
    bn_statistics="batch",
    cosine_annealing=False,
    loss_reduction="sum_per_shot",
)


# fmaml.IMAML()'s defaults. The iMAML paper (Rajeswaran et al. 2019) tuned lam per dataset
# (0.5 to 2 on Omniglot) and used 5 to 25 CG iterations.
IMAML_DEFAULTS = dict(imaml_lam=1.0, cg_steps=5)


def paper_defaults(dataset: str, ways: int | None) -> dict[str, Any]:
    """The MAML paper's setting for ``dataset`` with ``ways`` classes (5 if ``None``)."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}.")
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
        ConfigError: (a ``ValueError``) for a non-positive size, rate or iteration count,
            naming the option.
    """
    defaults = paper_defaults(config.dataset, config.ways)
    if config.algorithm == "mamlpp":
        defaults.update(MAMLPP_FIXES)
        defaults.update(MAMLPP_DEFAULTS[config.dataset])
    else:
        defaults.update(PLAIN_FIXES)
    fixed = _algorithm_field(config.algorithm, "inner_steps")
    if fixed is not None:  # ProtoNet: no inner step, in training or (by default) at test
        defaults.update(inner_steps=fixed, eval_inner_steps=fixed)
    if config.algorithm == "imaml":
        defaults.update(IMAML_DEFAULTS)
    values = config.to_dict()
    for key, value in defaults.items():
        if values.get(key) is None:
            values[key] = value
    if values["query"] is None:
        values["query"] = values["shots"]
    if values["eval_inner_steps"] is None:
        values["eval_inner_steps"] = values["inner_steps"]
    if config.model == "resnet12" and config.hidden is None:
        values["hidden"] = 64  # MetaOptNet's widths (64, 160, 320, 640), not conv4's
    if values["keep_best"] is None:
        values["keep_best"] = config.dataset != "sinusoid"
    resolved = TrainConfig(**values)
    check(resolved)
    return resolved


def check(config: TrainConfig) -> None:
    """Raise :class:`~fmaml.errors.ConfigError` naming the first option that cannot work."""
    prototypes = _algorithm_field(config.algorithm, "head_init") is not None
    positive_ints = (
        "ways",
        "shots",
        "query",
        "meta_batch",
        *(() if prototypes else ("inner_steps", "eval_inner_steps")),
        "iterations",
        "val_every",
        "val_episodes",
        "checkpoint_every",
        "log_every",
    )
    for name in positive_ints:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be a positive integer, got {value!r}."
            )
    for name in ("image_size", "hidden"):
        value = getattr(config, name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ConfigError(
                f"--{name.replace('_', '-')} must be a positive integer, got {value!r}."
            )
    if config.model not in MODELS:
        raise ConfigError(f"--model must be one of {list(MODELS)}, got {config.model!r}.")
    if config.model == "resnet12" and config.max_pool is not None:
        raise ConfigError(
            "--max-pool/--stride choose conv4's downsampling; ResNet-12 always max-pools. Drop "
            "them, or use --model conv4."
        )
    if config.model == "resnet12" and config.dataset == "sinusoid":
        raise ConfigError(
            "--model resnet12 is an image network; the sinusoid uses an MLP. Drop --model."
        )
    for name in ("inner_lr", "outer_lr"):
        value = getattr(config, name)
        if not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value!r}.")
    for name in ("msl_epochs", "da_epochs"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be 0 (off) or more, got {value!r}.")
    if config.loss_reduction not in ("sum_per_shot", "mean"):
        raise ConfigError(
            f"loss_reduction must be 'sum_per_shot' or 'mean', got {config.loss_reduction!r}."
        )
    if config.bn_statistics not in ("batch", "support"):
        raise ConfigError(
            f"--bn-statistics must be 'batch' or 'support', got {config.bn_statistics!r}."
        )
    if config.lslr and config.algorithm == "metasgd":
        raise ConfigError(
            "--lslr (per-step, per-tensor rates) and --algorithm metasgd (per-element rates) "
            "both learn the inner rate; choose one."
        )
    if config.algorithm == "reptile":
        query_only = _mamlpp_inner_options(config)
        if query_only:
            raise ConfigError(
                f"--algorithm reptile follows params - adapted, not a query loss, so "
                f"{', '.join(query_only)} (MAML++ settings of the query loss and inner loop) "
                "would change nothing or never be trained. Drop them, or use --algorithm "
                "maml/mamlpp."
            )
    if prototypes:
        _check_prototypes(config)
    parse_size(config.memory_budget)
    _check_inner_optimizer(config)
    _check_imaml(config)
    from fmaml.engine.strategy import Strategy

    strategy_fields = {f.name for f in dataclasses.fields(Strategy)}
    unknown = sorted(set(config.strategy) - strategy_fields)
    if unknown:
        raise ConfigError(
            f"strategy: unknown fields {unknown}; the fields of fmaml.Strategy are "
            f"{sorted(strategy_fields)}."
        )
    try:
        Strategy(**config.strategy)
    except ValueError as error:  # Strategy() names the field and the value it got
        raise ConfigError(f"strategy: {error}") from None
    _check_precision(config)
    if config.within_alphabet and config.dataset != "omniglot":
        raise ConfigError(
            f"--within-alphabet draws each task's classes from one Omniglot alphabet; "
            f"--dataset {config.dataset} has no alphabets. Drop --within-alphabet or use "
            "--dataset omniglot."
        )
    if config.dataset != "sinusoid" and config.ways < 2:
        raise ConfigError(f"--ways must be at least 2 for classification, got {config.ways}.")


def _check_precision(config: TrainConfig) -> None:
    """--precision: a known name; bf16 mixed precision only over float32 parameters."""
    if config.precision not in PRECISIONS:
        raise ConfigError(
            f"--precision must be one of {list(PRECISIONS)}, got {config.precision!r}."
        )
    if config.precision == "bf16" and config.dtype != "float32":
        raise ConfigError(
            f"--precision bf16 runs the forward pass in bfloat16 over float32 parameters, "
            f"but --dtype is {config.dtype}: autocast leaves {config.dtype} tensors alone, so "
            "nothing would run in bf16. Use --dtype float32 with --precision bf16, or drop "
            "--precision for a full-precision float64 run."
        )


def _check_prototypes(config: TrainConfig) -> None:
    """The settings ProtoNet and ProtoMAML (a head from class prototypes) can't work with."""
    name = config.algorithm
    if config.dataset == "sinusoid":
        raise ConfigError(
            f"--algorithm {name} starts each task's head from class prototypes, but a "
            "sinusoid task is a regression with no classes. Use a classification dataset "
            "(omniglot, miniimagenet, folder) or another algorithm."
        )
    for option in ("inner_steps", "eval_inner_steps"):
        value = getattr(config, option)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(
                f"--{option.replace('_', '-')} must be 0 or more with --algorithm {name}, "
                f"got {value!r}."
            )
    fixed = _algorithm_field(name, "inner_steps")
    if fixed == 0 and config.inner_steps != 0:
        raise ConfigError(
            f"--algorithm {name} takes no inner step in training, got --inner-steps "
            f"{config.inner_steps}. Drop --inner-steps, or use --algorithm protomaml (inner "
            "steps from the prototype head)."
        )
    if fixed is None and config.inner_steps < 1:
        raise ConfigError(
            f"--algorithm {name} adapts the prototype head with inner steps, got "
            "--inner-steps 0. Use --inner-steps 1 or more, or --algorithm protonet."
        )
    inner = _mamlpp_inner_options(config)
    if fixed == 0 and inner:
        raise ConfigError(
            f"--algorithm {name} takes no inner step, so {', '.join(inner)} (MAML++ "
            "settings of the inner loop) would change nothing. Drop them, or use --algorithm "
            "protomaml."
        )


def _mamlpp_inner_options(config: TrainConfig) -> list[str]:
    """The MAML++ settings of the inner loop and its per-step losses that ``config`` turns on
    (algorithms without a differentiated inner loop refuse them)."""
    return [
        option
        for option, on in (
            ("--lslr", config.lslr),
            ("--msl-epochs", config.msl_epochs),
            ("--da-epochs", config.da_epochs),
            ("--per-step-bn", config.per_step_bn),
        )
        if on
    ]


def _algorithm_field(name: str, field: str):
    """A field of the named algorithm (:data:`fmaml.algorithms.ALGORITHMS`); ``None`` for an
    unknown name (the command line offers only known ones)."""
    algorithm = ALGORITHMS.get(name)
    return None if algorithm is None else getattr(algorithm, field)


def _check_inner_optimizer(config: TrainConfig) -> None:
    """--inner-optimizer, --inner-hyper and --learn-inner-hyper (see :func:`check`)."""
    from fmaml.inner_optim import INNER_OPTIMIZERS, get_inner_optimizer, hyper_names

    name = config.inner_optimizer
    if name not in INNER_OPTIMIZERS:
        raise ConfigError(
            f"--inner-optimizer must be one of {sorted(INNER_OPTIMIZERS)}, got {name!r}."
        )
    try:
        get_inner_optimizer(name, **config.inner_hyper)
    except (TypeError, ValueError) as error:  # names the hyper-parameter and the value
        raise ConfigError(f"--inner-hyper: {error}") from None
    if not config.learn_inner_hyper:
        return
    if name == "sgd":
        raise ConfigError(
            "--learn-inner-hyper learns the inner optimiser's betas, but --inner-optimizer sgd "
            "has none. Use --inner-optimizer momentum or adam (or learn the rates with "
            "--algorithm metasgd or --lslr)."
        )
    if config.algorithm == "reptile":
        raise ConfigError(
            "--learn-inner-hyper with --algorithm reptile: Reptile's update (params - adapted) "
            "has no term for the inner optimiser's hyper-parameters, so they would never be "
            "trained. Drop --learn-inner-hyper, or use a query-loss algorithm (maml, metasgd)."
        )
    values = {**hyper_names(name), **config.inner_hyper}
    for key in LEARNED_HYPER[name]:
        if not 0 < values[key] < 1:
            raise ConfigError(
                f"--learn-inner-hyper learns {key} as sigmoid(logit), which never reaches 0 or "
                f"1; start it inside (0, 1), e.g. --inner-hyper {key}=0.5 (got {values[key]!r})."
            )


LEARNED_HYPER: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "momentum": ("beta",),
    "adam": ("beta1", "beta2"),
}
"""The hyper-parameters ``--learn-inner-hyper`` meta-learns, per inner optimiser."""


def _check_imaml(config: TrainConfig) -> None:
    """iMAML's settings only with --algorithm imaml, in range; no MAML++ inner-loop fixes."""
    given = [
        f"--{name.replace('_', '-')}"
        for name in ("imaml_lam", "cg_steps")
        if getattr(config, name) is not None
    ]
    if config.algorithm != "imaml":
        if given:
            raise ConfigError(
                f"{', '.join(given)} set iMAML's inner problem and conjugate-gradient solve, "
                f"but --algorithm is {config.algorithm}. Use --algorithm imaml, or drop them."
            )
        return
    lam, steps = config.imaml_lam, config.cg_steps
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0:
        raise ConfigError(f"--imaml-lam must be positive, got {lam!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--cg-steps must be a positive integer, got {steps!r}.")
    if config.inner_optimizer != "sgd":
        raise ConfigError(
            f"--algorithm imaml solves its inner problem by plain gradient descent, got "
            f"--inner-optimizer {config.inner_optimizer}. Drop --inner-optimizer, or use "
            "--algorithm maml."
        )
    query_only = _mamlpp_inner_options(config)
    if query_only:
        raise ConfigError(
            f"--algorithm imaml differentiates no inner step (its meta-gradient is the "
            f"implicit one, at the end of the inner problem), so {', '.join(query_only)} "
            "(MAML++ settings of the inner loop and its per-step losses) would change nothing "
            "or never be trained. Drop them, or use --algorithm maml/mamlpp."
        )


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str | None) -> int | None:
    """Bytes in ``text`` (``"6GB"``, ``"500 MB"``, ``"2GiB"``, ``"1e9"``); ``None`` stays.

    Raises:
        ConfigError: anything else, naming the option.

    Example:
        >>> parse_size("6GB"), parse_size("512MiB")
        (6000000000, 536870912)
    """
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(
            f"--memory-budget: expected a positive size such as 6GB, 500MB or 2GiB, got {text!r}."
        )
    return int(float(match.group(1)) * _UNITS[unit])
