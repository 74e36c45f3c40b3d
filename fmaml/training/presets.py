"""Named configurations: settings measured to work, under a name you can pass to ``train``.

A preset is a partial :class:`~fmaml.training.config.TrainConfig`: ``train --preset NAME``
starts from its settings, every option given on the command line replaces the preset's, and
what is left unset gets the paper's defaults (:func:`fmaml.training.config.resolve`). The
run's ``config.json`` records the preset's name and every resolved setting. Each preset says
what it was measured on and why it is not the default (README, "Named configurations").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fmaml.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """A named partial configuration.

    Attributes:
        name: what ``--preset`` takes.
        summary: one line on what it is for, printed by ``train``.
        settings: ``TrainConfig`` field values.
    """

    name: str
    summary: str
    settings: dict[str, Any]


PRESETS: dict[str, Preset] = {}
"""Every preset, by name (filled below)."""


def _add(preset: Preset) -> None:
    PRESETS[preset.name] = preset


def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name``.

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}.")
    return PRESETS[name]


def with_preset(name: str, **overrides: Any):
    """A ``TrainConfig`` from the preset ``name``, with ``overrides`` replacing its settings.

    Args:
        name: a key of :data:`PRESETS`.
        **overrides: ``TrainConfig`` fields; they win over the preset's.

    Returns:
        An unresolved :class:`~fmaml.training.config.TrainConfig` (pass it to
        :func:`fmaml.training.config.resolve`), its ``preset`` field set to ``name``.

    Raises:
        ConfigError: an unknown preset or field.

    Example:
        >>> from fmaml.training.presets import with_preset
        >>> config = with_preset("omniglot-unseen", seed=1)
        >>> config.max_pool, config.seed, config.preset
        (True, 1, 'omniglot-unseen')
    """
    from fmaml.training.config import TrainConfig

    preset = get_preset(name)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"with_preset(): unknown TrainConfig fields {unknown}.")
    return TrainConfig(**{**preset.settings, **overrides, "preset": name})


# Measured on the shared Omniglot subset's held-out alphabets (README, "Unseen alphabets"):
# 45 minutes of one core gave 97.53 +- 0.56 % on 5-way 1-shot across alphabets and
# 84.92 +- 0.68 % on 20-way 1-shot within one (after 10 steps at test), the best of nine
# configurations on both. The mean cross-entropy makes the step at 0.1 a twentieth of the
# summed loss's for 20-way tasks, small enough that steps never trained keep helping at test.
# Not a default: every Omniglot default is the MAML paper's protocol, which the README's table
# reproduces (README, "Named configurations").
_add(
    Preset(
        "omniglot-unseen",
        "Omniglot for unseen alphabets: max-pool conv4-64 trained 20-way 1-shot, meta-batch 8, "
        "1 inner step at 0.1 on the mean cross-entropy, 10 steps at test",
        dict(
            dataset="omniglot",
            max_pool=True,
            ways=20,
            shots=1,
            meta_batch=8,
            inner_steps=1,
            eval_inner_steps=10,
            inner_lr=0.1,
            loss_reduction="mean",
        ),
    )
)
