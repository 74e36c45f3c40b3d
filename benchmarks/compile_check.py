"""Does ``torch.compile`` give the exact meta-gradient? The evidence behind
``Strategy(compile=True)`` refusing models with BatchNorm.

Compiles one meta-step (``fmaml.meta_loss`` over a vmapped meta-batch, then
``torch.autograd.grad``) for a small conv4 with and without BatchNorm and for the sinusoid MLP,
in float64, and prints each compiled meta-gradient's largest relative deviation from the eager
one, second- and first-order. The strategy itself is bypassed here (it refuses BatchNorm).

    python benchmarks/compile_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fmaml


def conv_net(batchnorm: bool) -> nn.Module:
    model = fmaml.nn.conv4(num_classes=3, in_channels=1, hidden=8, image_size=12)
    if not batchnorm:
        for name, module in list(model.named_modules()):
            if isinstance(module, fmaml.nn.BatchNorm):
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    return model


def problem(name: str, device: str):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model, criterion = fmaml.nn.mlp(), F.mse_loss
        xs = torch.rand(4, 10, 1, generator=generator)
        xq = torch.rand(4, 10, 1, generator=generator)
        ys, yq = torch.sin(xs), torch.sin(xq)
    else:
        model, criterion = conv_net(batchnorm=name == "conv4+batchnorm"), F.cross_entropy
        xs = torch.rand(4, 3, 1, 12, 12, generator=generator)
        xq = torch.rand(4, 6, 1, 12, 12, generator=generator)
        ys, yq = torch.arange(3).repeat(4, 1), torch.arange(3).repeat(4, 2)
    model = model.to(device=device, dtype=torch.float64)
    params = fmaml.params_of(model)

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, torch.float64) if t.is_floating_point() else t.to(device)

    tasks = fmaml.Task((move(xs), move(ys)), (move(xq), move(yq)))
    return fmaml.supervised_loss(model, criterion), params, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for name in ("mlp", "conv4 without batchnorm", "conv4+batchnorm"):
        loss_fn, params, tasks = problem(name, args.device)
        for first_order in (False, True):

            def step(params, tasks, loss_fn=loss_fn, first_order=first_order):
                inner = fmaml.InnerLoop(0.1, num_steps=2, first_order=first_order)
                loss = fmaml.meta_loss(loss_fn, params, tasks, inner)
                return torch.autograd.grad(loss, list(params.values()))

            eager = step(params, tasks)
            torch._dynamo.reset()  # a fresh cache: every case compiles
            counters = torch._dynamo.utils.counters
            counters.clear()
            start = time.perf_counter()
            compiled = torch.compile(step)(params, tasks)
            seconds = time.perf_counter() - start
            graphs = counters["stats"]["unique_graphs"]
            breaks = sum(counters["graph_break"].values())
            scale = max(g.abs().max().item() for g in eager)
            pairs = zip(compiled, eager, strict=True)
            deviation = max((c - e).abs().max().item() for c, e in pairs) / scale
            order = "first" if first_order else "second"
            print(
                f"{name:24s} {order}-order: compiled vs eager meta-gradient, largest relative "
                f"deviation {deviation:.1e} ({graphs} graphs compiled, {breaks} graph breaks, "
                f"compile + first step {seconds:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
