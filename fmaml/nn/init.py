"""Seeded initialisation from a ``torch.Generator``: no global random state is read or changed."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fmaml.nn.batchnorm import BatchNorm


def seeded(make: Callable[[], nn.Module], generator: torch.Generator) -> nn.Module:
    """``make()`` with its parameters drawn from ``generator``, as torch's own
    ``reset_parameters`` draws them.

    The model is built on the ``meta`` device (no random number is drawn), moved to the
    generator's device and initialised module by module in registration order: convolutions
    and linear layers as torch does (``kaiming_uniform_(a=sqrt(5))`` for the weight, then
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for the bias), BatchNorm weights 1 and biases 0.
    With ``torch.Generator().manual_seed(s)`` the weights equal those ``make()`` draws after
    ``torch.manual_seed(s)`` (``tests/test_core.py``), and two threads may build models at
    once: the global generator is never touched.

    Args:
        make: builds the model (fmaml's ``mlp``, ``conv4``, ``resnet12``, or a model of
            ``nn.Conv*d``, ``nn.Linear`` and BatchNorm layers).
        generator: where the weights are drawn from.

    Returns:
        The model, float32, on ``generator.device``.

    Raises:
        TypeError: the model has a module with parameters or buffers of another kind (its
            initialisation is not known here); build it yourself under
            ``torch.random.fork_rng`` instead.

    Example:
        >>> import torch, fmaml
        >>> g = torch.Generator().manual_seed(0)
        >>> model = seeded(lambda: fmaml.nn.mlp(), g)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> torch.equal(model.head.weight, fmaml.nn.mlp().head.weight)
        True
    """
    with torch.device("meta"):
        model = make()
    model = model.to_empty(device=generator.device)
    for module in model.modules():
        _init(module, generator)
    return model


def _init(module: nn.Module, generator: torch.Generator) -> None:
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if not own:
        return
    with torch.no_grad():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, BatchNorm) and not list(module.buffers(recurse=False)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        else:
            raise TypeError(
                f"fmaml.nn.init.seeded(): don't know how torch initialises "
                f"{type(module).__name__} (it has parameters or buffers). Expected "
                "nn.Conv*d, nn.Linear or fmaml.nn.BatchNorm layers; build this model yourself "
                "(e.g. under torch.random.fork_rng with torch.manual_seed)."
            )
