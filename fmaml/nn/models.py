"""The networks of the MAML paper, with ``body`` and ``head`` submodules.

With these names ANIL is ``adapt_keys=lambda k: k.startswith("head.")`` and BOIL its
complement.
"""

from __future__ import annotations

from torch import Tensor, nn

from fmaml.nn.batchnorm import BatchNorm


class Classifier(nn.Module):
    """``head(body(x))``: a feature extractor and a linear head."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def conv4(
    num_classes: int,
    in_channels: int = 1,
    hidden: int = 64,
    image_size: int = 28,
    *,
    max_pool: bool | None = None,
) -> Classifier:
    """The MAML paper's 4-block convolutional network.

    Each block is 3x3 conv (padding 1) -> :class:`BatchNorm` (batch statistics) -> ReLU and
    then either a 2x2 max-pool (mini-ImageNet) or, with ``max_pool=False``, a stride-2
    convolution instead (the paper's Omniglot network). The head is linear on the flattened
    features.

    Args:
        num_classes: outputs of the head (``num_ways``).
        in_channels: 1 for Omniglot, 3 for mini-ImageNet.
        hidden: filters per block: 64 for Omniglot, 32 for mini-ImageNet (MAML paper).
        image_size: input height = width: 28 for Omniglot, 84 for mini-ImageNet.
        max_pool: pooling (True) or stride-2 convolutions (False); default: stride for inputs
            of 28 or less, pooling above, as in the paper.

    Returns:
        A :class:`Classifier` mapping ``[n, in_channels, image_size, image_size]`` to
        ``[n, num_classes]``; parameters ``body.block{i}.conv.*``, ``body.block{i}.norm.*``,
        ``head.*``.

    Raises:
        ValueError: for a non-positive size.

    Example:
        >>> import torch, fmaml
        >>> fmaml.nn.conv4(num_classes=5)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """
    for name, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("hidden", hidden),
        ("image_size", image_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"conv4(): `{name}` must be a positive integer, got {value!r}.")
    if max_pool is None:
        max_pool = image_size > 28
    blocks = nn.Sequential()
    size, channels = image_size, in_channels
    for i in range(4):
        block = nn.Sequential()
        block.add_module(
            "conv", nn.Conv2d(channels, hidden, 3, stride=1 if max_pool else 2, padding=1)
        )
        block.add_module("norm", BatchNorm(hidden))
        block.add_module("relu", nn.ReLU())
        if max_pool:
            block.add_module("pool", nn.MaxPool2d(2))
            size = size // 2
        else:
            size = (size + 1) // 2
        blocks.add_module(f"block{i}", block)
        channels = hidden
    blocks.add_module("flatten", nn.Flatten())
    return Classifier(blocks, nn.Linear(hidden * size * size, num_classes))


def mlp(
    in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1
) -> Classifier:
    """A ReLU multi-layer perceptron; the default is the MAML paper's sinusoid net 1-40-40-1.

    Args:
        in_features: input width.
        hidden: widths of the hidden layers.
        out_features: output width.

    Returns:
        A :class:`Classifier` with ``body.0.weight``, ``body.0.bias``, ... and ``head.*``.

    Example:
        >>> import torch, fmaml
        >>> fmaml.nn.mlp()(torch.zeros(7, 1)).shape
        torch.Size([7, 1])
    """
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return Classifier(nn.Sequential(*layers), nn.Linear(width, out_features))
