"""A small float64 conv4 problem the gradient-contract tests share.

Not a conftest: import what you need, ``from conftest_tasks import small_conv_problem``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import fmaml

DTYPE = torch.float64


def small_conv_problem(
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> tuple[fmaml.SupervisedLoss, dict[str, torch.Tensor], fmaml.Task]:
    """``(loss_fn, params, tasks)``: a 3-way conv4 (4 filters, 12x12 images) in float64 and 4
    tasks of 6 support and 9 query images, all seeded."""
    torch.manual_seed(0)
    model = fmaml.nn.conv4(3, hidden=4, image_size=12).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(4, 6, 1, 12, 12, generator=g, dtype=DTYPE)
    xq = torch.randn(4, 9, 1, 12, 12, generator=g, dtype=DTYPE)
    ys, yq = torch.arange(3).repeat(2).expand(4, -1), torch.arange(3).repeat(3).expand(4, -1)
    tasks = fmaml.Task(support=(xs, ys), query=(xq, yq))
    return fmaml.supervised_loss(model, criterion), fmaml.params_of(model), tasks
