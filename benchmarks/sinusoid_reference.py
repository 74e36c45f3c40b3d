"""An independent MAML for the sinusoid, in plain torch.func: the yardstick for fmaml's figures.

Nothing of fmaml is used to train or to adapt: the network, the task sampler, the inner step,
the meta-loss and the loop are written out here (MAML paper, section 5.1 and appendix C:
MLP 1-40-40-1, K=10, one inner step at 0.01 on the MSE, meta-batch 25, Adam 1e-3, 70,000
iterations, the final model). ``test`` adapts and scores with this file's own code too, on the
same 600 tasks as ``python cli.py test`` (drawn with fmaml's sampler from the same seed, so the
two tests can be compared task for task); it reads this script's parameters or an fmaml
checkpoint.

    OMP_NUM_THREADS=1 python benchmarks/sinusoid_reference.py train --seed 0 --out /tmp/ref0.pt
    python benchmarks/sinusoid_reference.py test /tmp/ref0.pt
    python benchmarks/sinusoid_reference.py test /tmp/sin/latest.pt      # an fmaml run
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.func import functional_call, grad, vmap

INNER_LR = 0.01


def network() -> torch.nn.Sequential:
    """The paper's 1-40-40-1 ReLU MLP, torch's default initialisation."""
    return torch.nn.Sequential(
        torch.nn.Linear(1, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 1),
    )


NET = network()


def mse(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The MSE of the network with ``params`` on one task's points ``x, y: [n, 1]``."""
    return ((functional_call(NET, params, (x,)) - y) ** 2).mean()


def inner_step(params: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One gradient step on the support points, differentiable (second order)."""
    grads = grad(mse)(params, x, y)
    return {k: params[k] - INNER_LR * grads[k] for k in params}


def meta_loss(params: dict, support_x, support_y, query_x, query_y) -> torch.Tensor:
    """Mean over tasks ``[T, n, 1]`` of the query MSE after one inner step."""

    def one(sx, sy, qx, qy):
        return mse(inner_step(params, sx, sy), qx, qy)

    return vmap(one)(support_x, support_y, query_x, query_y).mean()


def sample(num_tasks: int, num_points: int, generator: torch.Generator):
    """``A ~ U[0.1, 5]``, phase ``~ U[0, pi]``, ``x ~ U[-5, 5]``: support and query halves."""
    amplitude = 0.1 + 4.9 * torch.rand(num_tasks, 1, 1, generator=generator)
    phase = math.pi * torch.rand(num_tasks, 1, 1, generator=generator)
    x = -5 + 10 * torch.rand(num_tasks, 2 * num_points, 1, generator=generator)
    y = amplitude * torch.sin(x - phase)
    return x[:, :num_points], y[:, :num_points], x[:, num_points:], y[:, num_points:]


def train(seed: int, iterations: int) -> dict:
    """Meta-train from ``seed``; returns the final parameters (named as in ``network()``)."""
    torch.manual_seed(seed)
    params = {k: v.detach().clone().requires_grad_() for k, v in network().named_parameters()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed + 1000)
    start = time.perf_counter()
    for iteration in range(1, iterations + 1):
        loss = meta_loss(params, *sample(25, 10, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if iteration % 10_000 == 0 or iteration == iterations:
            print(
                f"iteration {iteration}: loss {loss.item():.4f}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    return {k: v.detach() for k, v in params.items()}


def read_params(path: str) -> dict:
    """This script's parameters, or an fmaml checkpoint's (``body.0.weight`` -> ``0.weight``)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    params = saved.get("params", saved)
    names = {"body.0": "0", "body.2": "2", "head": "4"}
    renamed = {}
    for name, value in params.items():
        module, _, leaf = name.rpartition(".")
        renamed[f"{names.get(module, module)}.{leaf}"] = value.float()
    return renamed


def test(params: dict, num_shots: int, num_steps: int = 10, episodes: int = 600) -> torch.Tensor:
    """``[episodes, num_steps + 1]`` query MSE (100 fresh points) before and after each step,
    on the 600 tasks of ``cli.py test`` (fmaml's sampler, seed
    ``fmaml.training.train.TEST_SEED``)."""
    from fmaml.tasks.sinusoid import SinusoidTasks
    from fmaml.training.train import TEST_SEED

    generator = torch.Generator().manual_seed(TEST_SEED)
    tasks = SinusoidTasks(num_shots=num_shots, num_query=100).sample(episodes, generator)

    def scores(sx, sy, qx, qy):
        adapted, out = params, [mse(params, qx, qy)]
        for _ in range(num_steps):
            adapted = inner_step(adapted, sx, sy)
            out.append(mse(adapted, qx, qy))
        return torch.stack(out)

    return vmap(scores)(*tasks.support, *tasks.query)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    training = commands.add_parser("train")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--iterations", type=int, default=70_000)
    training.add_argument("--out", required=True)
    testing = commands.add_parser("test")
    testing.add_argument("params")
    args = parser.parse_args()
    if args.command == "train":
        torch.save(train(args.seed, args.iterations), args.out)
        return
    params = read_params(args.params)
    for num_shots in (5, 10):
        s = test(params, num_shots)
        cells = "  ".join(
            f"{step}: {s[:, step].mean():.3f} ± {1.96 * s[:, step].std() / len(s) ** 0.5:.3f}"
            for step in (1, 5, 10)
        )
        print(f"K={num_shots}, MSE on {len(s)} tasks after 1 / 5 / 10 steps  {cells}")


if __name__ == "__main__":
    main()
