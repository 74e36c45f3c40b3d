"""MAML on Omniglot with your own nn.Module, BatchNorm included, from a local folder.

The folder is in the official Omniglot layout, `<alphabet>/<character>/<image>.png` (or a
folder holding `images_background/` and `images_evaluation/`). The split keeps whole
alphabets apart: three quarters train, a quarter test. Any `nn.BatchNorm2d` in the model is
replaced by fmaml's exact batch-statistics BatchNorm; the parameter names stay the model's.

    python examples/omniglot_custom_module.py --data-root data/omniglot
    python examples/omniglot_custom_module.py --data-root data/omniglot --tiny
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fmaml
from fmaml.tasks import EpisodeSampler, load_splits


def block(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Net(nn.Module):
    """Three conv blocks and a linear head: `body.*` and `head.*` (so ANIL works too)."""

    def __init__(self, num_ways: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            block(1, hidden), block(hidden, hidden), block(hidden, hidden), nn.Flatten()
        )
        self.head = nn.Linear(hidden * 3 * 3, num_ways)  # 28 -> 14 -> 7 -> 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="a folder in the Omniglot layout")
    parser.add_argument("--tiny", action="store_true", help="a few iterations, a small batch")
    args = parser.parse_args()
    iterations, num_tasks, hidden = (3, 2, 8) if args.tiny else (1000, 16, 32)

    splits = load_splits("omniglot", args.data_root, split="alphabet:0.75,0,0.25")
    print(f"classes: train {splits['train'].num_classes}, test {splits['test'].num_classes}")
    train_tasks = EpisodeSampler(splits["train"], num_ways=5, num_shots=1, num_query=1, rotate=True)
    test_tasks = EpisodeSampler(splits["test"], num_ways=5, num_shots=1, num_query=15, rotate=True)

    with torch.random.fork_rng():  # seed the initial weights without changing global state
        torch.manual_seed(0)
        model = Net(num_ways=5, hidden=hidden)
    generator = torch.Generator().manual_seed(0)  # draws the tasks
    params = fmaml.params_of(model)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)  # nn.BatchNorm2d swapped here
    score_fn = loss_fn.with_criterion(fmaml.accuracy)
    inner = fmaml.InnerLoop(0.1, num_steps=1)  # on the mean cross-entropy: 0.4 / 5 ways
    outer = torch.optim.Adam(params.values(), lr=1e-3)

    for iteration in range(1, iterations + 1):
        loss, grads = fmaml.value_and_grad(
            loss_fn, params, train_tasks.sample(num_tasks, generator), inner
        )
        outer.zero_grad()
        for name, p in params.items():
            p.grad = grads.params[name]
        outer.step()
        if iteration % 100 == 0 or iteration == iterations:
            print(f"iteration {iteration}: meta-loss {loss.item():.4f}")

    test_generator = torch.Generator().manual_seed(1)
    episodes = [test_tasks.sample(num_tasks, test_generator) for _ in range(4 if args.tiny else 60)]
    scores = fmaml.evaluate(score_fn, loss_fn, params, episodes, inner.replace(num_steps=3))
    mean, ci95 = fmaml.mean_ci95(scores[:, -1])
    print(f"5-way 1-shot test accuracy after 3 steps: {100 * mean:.1f} ± {100 * ci95:.1f} %")
    print(f"final accuracy: {mean:.4f}")


if __name__ == "__main__":
    main()
