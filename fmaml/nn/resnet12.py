"""ResNet-12, the few-shot backbone of MetaOptNet (Lee et al. 2019), with ``body`` and ``head``.

With these names ANIL is ``adapt_keys=lambda k: k.startswith("head.")`` and BOIL its
complement, as for :func:`fmaml.nn.conv4`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fmaml.nn.batchnorm import BatchNorm
from fmaml.nn.init import seeded
from fmaml.nn.models import Classifier

MIN_SIZE = 16
"""The smallest input height and width: four 2x2 max-pools leave at least one pixel."""


class ResidualBlock(nn.Module):
    """One ResNet-12 block: three 3x3 conv -> BatchNorm (-> LeakyReLU, not after the third),
    plus a 1x1 conv -> BatchNorm shortcut, added, LeakyReLU, 2x2 max-pool.

    ``[n, in_channels, h, w]`` -> ``[n, out_channels, h // 2, w // 2]``. Convolutions have no
    bias (each is followed by a BatchNorm, whose offset plays that part), as in MetaOptNet.
    """

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = BatchNorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = BatchNorm(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = BatchNorm(out_channels)
        self.shortcut = nn.Sequential()
        self.shortcut.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, bias=False))
        self.shortcut.add_module("norm", BatchNorm(out_channels))
        self.relu = nn.LeakyReLU(negative_slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.pool(self.relu(out + self.shortcut(x)))


class ResNet12Body(nn.Module):
    """Four :class:`ResidualBlock` s and a global average pool:
    ``[n, in_channels, h, w]`` -> ``[n, widths[-1]]``; checks the input's shape first."""

    def __init__(self, in_channels: int, widths: Sequence[int], negative_slope: float):
        super().__init__()
        self.in_channels = in_channels
        channels = in_channels
        for i, width in enumerate(widths):
            self.add_module(f"block{i}", ResidualBlock(channels, width, negative_slope))
            channels = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or min(x.shape[2:]) < MIN_SIZE:
            if x.dim() != 4:
                fix = "Pass a batch of images (x.unsqueeze(0) for a single image)."
            elif x.shape[1] != self.in_channels:
                fix = f"Build the model with in_channels={x.shape[1]} to match the images."
            else:
                fix = f"Resize the images to at least {MIN_SIZE}x{MIN_SIZE} (mini-ImageNet: 84x84)."
            raise ValueError(
                f"resnet12(): expected images [n, {self.in_channels}, height, width] with "
                f"height and width at least {MIN_SIZE} (four 2x2 max-pools), got "
                f"{list(x.shape)}. {fix}"
            )
        for i in range(4):
            x = getattr(self, f"block{i}")(x)
        return self.flatten(self.pool(x))


def resnet12(
    num_classes: int,
    in_channels: int = 3,
    widths: Sequence[int] = (64, 160, 320, 640),
    *,
    negative_slope: float = 0.1,
    generator: torch.Generator | None = None,
) -> Classifier:
    """ResNet-12 as in MetaOptNet: four residual blocks, global average pool, linear head.

    Each block is three 3x3 convolutions (padding 1, no bias), each followed by a
    :class:`BatchNorm` (batch statistics, no running statistics, so it works under ``vmap``
    and in second-order meta-gradients as in :func:`conv4`) and a LeakyReLU, except the third,
    whose output is added to a 1x1 convolution + BatchNorm shortcut of the block's input
    before the LeakyReLU; then a 2x2 max-pool. The features ``[n, widths[-1]]`` are the
    spatial mean of the last block's output; the head is linear on them. MetaOptNet's
    DropBlock regularisation is not included (nor needed for exact meta-gradients: it draws
    random masks). Convolutions use Kaiming-normal initialisation (``fan_out``, as
    MetaOptNet), drawn from torch's global generator like any ``nn.Module``'s.

    Any input of at least ``16x16`` works: an ``84x84`` mini-ImageNet image leaves ``5x5``
    after the four pools, a ``32x32`` one ``2x2``; the head does not depend on the size.

    Args:
        num_classes: outputs of the head (``num_ways``).
        in_channels: channels of the images: 3 for mini-ImageNet, 1 for Omniglot.
        widths: the four blocks' channels; MetaOptNet's ``(64, 160, 320, 640)`` by default
            (12.4M parameters); the original ResNet-12 of TADAM uses ``(64, 128, 256, 512)``.
        negative_slope: of the LeakyReLU (0.1 as MetaOptNet; 0 for a ReLU).
        generator: draw the initial weights from it (:func:`fmaml.nn.init.seeded`; the
            global random state is then neither read nor changed); ``None``: torch's
            global generator, as ``nn`` layers do.

    Returns:
        A :class:`Classifier` mapping ``[n, in_channels, h, w]`` (``h, w >= 16``) to
        ``[n, num_classes]``; parameters ``body.block{i}.conv{j}.weight``,
        ``body.block{i}.norm{j}.weight`` / ``.bias`` (``j`` = 1, 2, 3),
        ``body.block{i}.shortcut.conv.weight``, ``body.block{i}.shortcut.norm.*``
        (``i`` = 0..3), ``head.weight``, ``head.bias``. Calling it with images of the wrong
        channels or smaller than ``16x16`` raises ``ValueError``.

    Raises:
        ValueError: a non-positive ``num_classes`` or ``in_channels``, ``widths`` that are
            not four positive integers, or a negative ``negative_slope``.

    Example:
        >>> import torch, fmaml
        >>> model = fmaml.nn.resnet12(num_classes=5, widths=(4, 8, 8, 16))
        >>> model(torch.zeros(2, 3, 84, 84)).shape
        torch.Size([2, 5])
        >>> [k for k in fmaml.params_of(model) if k.startswith("head.")]
        ['head.weight', 'head.bias']

    References:
        Lee, Maji, Ravichandran & Soatto, "Meta-Learning with Differentiable Convex
        Optimization" (MetaOptNet), CVPR 2019; Oreshkin, Rodríguez & Lacoste, "TADAM:
        Task dependent adaptive metric for improved few-shot learning", NeurIPS 2018.
    """
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"resnet12(): `{name}` must be a positive integer, got {value!r}.")
    widths = tuple(widths) if isinstance(widths, Sequence) else widths
    if (
        not isinstance(widths, tuple)
        or len(widths) != 4
        or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)
    ):
        raise ValueError(
            f"resnet12(): `widths` must be four positive integers (one per block), got "
            f"{widths!r}. Use e.g. widths=(64, 160, 320, 640) (MetaOptNet) or a smaller "
            "(16, 40, 80, 160)."
        )
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise ValueError(f"resnet12(): `negative_slope` must be a number, got {negative_slope!r}.")
    if negative_slope < 0:
        raise ValueError(
            f"resnet12(): `negative_slope` must be at least 0 (0 is a ReLU), got "
            f"{negative_slope!r}."
        )

    def make_body() -> nn.Module:
        return ResNet12Body(in_channels, widths, float(negative_slope))

    def make_head() -> nn.Module:
        return nn.Linear(widths[-1], num_classes)

    # the draws in the order torch.manual_seed(s); resnet12(...) makes them
    body = make_body() if generator is None else seeded(make_body, generator)
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(
                module.weight, mode="fan_out", nonlinearity="leaky_relu", generator=generator
            )
    head = make_head() if generator is None else seeded(make_head, generator)
    return Classifier(body, head)
