"""A meta-learning problem: a model, its losses and where its tasks come from.

The training loop and the evaluation command see only a :class:`Problem`. This module holds
what every problem shares and the sinusoid problem; :mod:`fmaml.training.image_problems`
builds on it for image data, and :func:`fmaml.training.train.build_problem` picks one per config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmaml.errors import ConfigError, InputError
from fmaml.module import SupervisedLoss, accuracy, supervised_loss
from fmaml.nn import conv4, mlp, resnet12
from fmaml.nn.init import seeded
from fmaml.tasks.sinusoid import SinusoidTasks
from fmaml.training.config import TrainConfig
from fmaml.types import Task

SINUSOID_EVAL_QUERY = 100
"""Query points per sinusoid evaluation task: enough to measure the MSE of the whole curve."""


class EmptySplit(InputError, LookupError):
    """Raised by a problem's ``episodes`` for a split that holds no classes.

    Args:
        split: the split asked for (``"val"``, say).
        available: the splits the data does have.
        rule: how the classes were split (``--split``), for the message.
    """

    def __init__(self, split: str, available: tuple[str, ...] = (), rule: str | None = None):
        self.split, self.available, self.rule = split, tuple(available), rule
        others = [name for name in self.available if name not in ("train", split)]
        instead = f"Evaluate on --split {others[0]}, or train" if others else "Train"
        super().__init__(
            f"the data has no {split!r} split: its classes were split into "
            f"{', '.join(self.available) or 'nothing'} (--split {rule or 'default'}). "
            f"{instead} with a --split that gives {split!r} a share, e.g. "
            "alphabet:0.7,0.1,0.2 (see README, Data)."
        )

    def __reduce__(self):  # keep the arguments when pickled (e.g. sent between ranks)
        return (type(self), (self.split, self.available, self.rule))


@dataclass
class Problem:
    """What the training loop needs to know about a dataset.

    Attributes:
        model: the network (its parameter names key ``params``).
        loss_fn: the inner and outer loss, ``(params, (x, y)) -> scalar``.
        score_fn: the reported metric, same signature (accuracy or MSE).
        score_name: ``"accuracy"`` or ``"mse"``.
        higher_is_better: whether a larger score is better.
        sample: ``sample(num_tasks, generator, shard=None) -> Task``, a training meta-batch.
            With ``shard=(start, stop)`` only tasks ``start:stop`` of it are built, but the
            whole meta-batch is drawn, so ``generator`` advances as without ``shard`` (every
            rank of a distributed run keeps the same generator state).
        episodes: ``episodes(split, num_episodes, seed, chunk, shard=None) -> iterator of
            Task``: fixed evaluation episodes, the same for the same seed, in chunks of at most
            ``chunk`` tasks; with ``shard=(start, stop)`` only episodes ``start:stop``.
        data: one line saying which classes each split holds ("" where there are none).
        splits: the splits that hold tasks (``episodes`` raises :class:`EmptySplit` for others).
        protocol: ``protocol(split) -> dict``: how the episodes of ``split`` are drawn,
            ``{"protocol": name, ...}`` (Omniglot: ``"within-alphabet"`` with the alphabets
            used and skipped, or ``"across-alphabets"``); ``None`` where there is no choice.
    """

    model: nn.Module
    loss_fn: SupervisedLoss
    score_fn: SupervisedLoss
    score_name: str
    higher_is_better: bool
    sample: Callable[..., Task]
    episodes: Callable[..., Iterator[Task]]
    data: str = ""
    splits: tuple[str, ...] = ("train", "val", "test")
    protocol: Callable[[str], dict] | None = None


def dtype_of(config: TrainConfig) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    except KeyError:
        raise ConfigError(f"--dtype must be float32 or float64, got {config.dtype!r}.") from None


def sinusoid_problem(config: TrainConfig) -> Problem:
    """The sinusoid regression :class:`Problem` of a resolved config: the MLP, MSE, tasks."""
    dtype, device = dtype_of(config), torch.device(config.device)
    model = seeded(lambda: mlp(hidden=(config.hidden, config.hidden)), _init_generator(config))
    model = model.to(device=device, dtype=dtype)
    loss_fn = supervised_loss(model, F.mse_loss)
    train_tasks = SinusoidTasks(num_shots=config.shots, num_query=config.query)
    eval_tasks = dataclasses.replace(train_tasks, num_query=SINUSOID_EVAL_QUERY)

    def sample(num_tasks: int, generator: torch.Generator, shard=None) -> Task:
        tasks = train_tasks.sample(num_tasks, generator, dtype=dtype, device=device)
        return tasks if shard is None else _slice(tasks, *shard)

    def episodes(
        split: str, num_episodes: int, seed: int, chunk: int, shard=None
    ) -> Iterator[Task]:
        generator = torch.Generator(device=device).manual_seed(seed)
        tasks = eval_tasks.sample(num_episodes, generator, dtype=dtype, device=device)
        first, stop = (0, num_episodes) if shard is None else shard
        for start in range(first, stop, chunk):
            yield _slice(tasks, start, min(start + chunk, stop))

    return Problem(model, loss_fn, loss_fn, "mse", False, sample, episodes)


def classification_problem(
    model: nn.Module, num_shots: int, sample, episodes, loss_reduction: str = "sum_per_shot"
) -> Problem:
    """A classification :class:`Problem`.

    With ``loss_reduction="sum_per_shot"`` the loss is the MAML authors' cross-entropy: summed
    over the set and divided by ``num_shots`` (N times the mean), so the paper's inner rates
    apply unchanged; ``"mean"`` is the mean cross-entropy (MAML++).
    """

    def cross_entropy_per_shot(logits, y):
        return F.cross_entropy(logits, y, reduction="sum") / num_shots

    criterion = cross_entropy_per_shot if loss_reduction == "sum_per_shot" else F.cross_entropy
    loss_fn = supervised_loss(model, criterion)
    return Problem(
        model, loss_fn, loss_fn.with_criterion(accuracy), "accuracy", True, sample, episodes
    )


def _init_generator(config: TrainConfig) -> torch.Generator:
    """The generator a run's initial weights come from (on the CPU: the same weights on every
    device), seeded with the run's seed; the global random state is never touched."""
    return torch.Generator().manual_seed(config.seed)


def _slice(tasks: Task, start: int, stop: int) -> Task:
    return Task(
        support=tuple(t[start:stop] for t in tasks.support),
        query=tuple(t[start:stop] for t in tasks.query),
    )


def image_model(config: TrainConfig, in_channels: int) -> nn.Module:
    """The image network of a config (conv4 or ResNet-12), initialised from the run's seed."""
    dtype, device = dtype_of(config), torch.device(config.device)
    if config.model == "resnet12":
        h = config.hidden
        widths = (h, round(2.5 * h), 5 * h, 10 * h)
        model = resnet12(config.ways, in_channels, widths, generator=_init_generator(config))
    else:
        model = seeded(
            lambda: conv4(
                config.ways,
                in_channels,
                config.hidden,
                config.image_size,
                max_pool=config.max_pool,
            ),
            _init_generator(config),
        )
    return model.to(device=device, dtype=dtype)


def __getattr__(name: str):
    if name == "build_problem":  # moved so that this module and image_problems don't import
        raise ImportError(  # each other
            "fmaml.training.problems.build_problem moved to fmaml.training.train.build_problem: "
            "import it from there."
        )
    raise AttributeError(f"module 'fmaml.training.problems' has no attribute {name!r}")
