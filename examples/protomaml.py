"""ProtoNet and ProtoMAML: one knob, `head_init="prototypes"`.

Before the inner loop the linear head is set from the support set's class means in the
body's embedding (Triantafillou et al. 2020): `W = 2 c_k`, `b = -|c_k|^2`. With
`num_steps=0` that head is ProtoNet (Snell et al. 2017); with inner steps it is ProtoMAML.
The tasks here are synthetic: each class is a random 28x28 image, and its examples are that
image plus noise.

    python examples/protomaml.py                # 100 iterations of each
    python examples/protomaml.py --tiny
"""

import argparse

import torch
import torch.nn.functional as F

import fmaml


def noisy_tasks(num_tasks: int, generator: torch.Generator, num_ways: int = 5) -> fmaml.Task:
    """num_ways-way 1-shot tasks, 3 query examples per class."""
    centres = torch.rand(num_tasks, num_ways, 1, 1, 28, 28, generator=generator)
    examples = centres + 0.3 * torch.randn(num_tasks, num_ways, 4, 1, 28, 28, generator=generator)
    labels = torch.arange(num_ways).view(1, num_ways, 1).expand(num_tasks, num_ways, 4)
    xs, xq = examples[:, :, :1].flatten(1, 2), examples[:, :, 1:].flatten(1, 2)
    ys, yq = labels[:, :, :1].flatten(1), labels[:, :, 1:].flatten(1)
    return fmaml.Task(support=(xs, ys), query=(xq, yq))


def train(name: str, inner: fmaml.InnerLoop, iterations: int, num_tasks: int, hidden: int):
    generator = torch.Generator().manual_seed(0)
    model = fmaml.nn.seeded(
        lambda: fmaml.nn.conv4(num_classes=5, in_channels=1, hidden=hidden, image_size=28),
        generator,
    )
    params = fmaml.params_of(model)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    score_fn = loss_fn.with_criterion(fmaml.accuracy)
    outer = torch.optim.Adam(params.values(), lr=1e-3)
    for _ in range(iterations):
        loss, grads = fmaml.value_and_grad(
            loss_fn, params, noisy_tasks(num_tasks, generator), inner
        )
        outer.zero_grad()
        for key, p in params.items():
            p.grad = grads.params[key]
        outer.step()
    # The meta-learned head only fixes the head's shape: the prototypes replace it.
    assert all(grads.params[k].abs().max() == 0 for k in ("head.weight", "head.bias"))

    test_generator = torch.Generator().manual_seed(1)
    episodes = [noisy_tasks(num_tasks, test_generator) for _ in range(4)]
    scores = fmaml.evaluate(score_fn, loss_fn, params, episodes, inner)  # [episodes, steps + 1]
    mean, ci95 = fmaml.mean_ci95(scores[:, -1])
    print(f"{name}: meta-loss {loss.item():.4f}, accuracy {100 * mean:.1f} ± {100 * ci95:.1f} %")
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few iterations, a small batch")
    args = parser.parse_args()
    iterations, num_tasks, hidden = (3, 2, 8) if args.tiny else (100, 8, 32)

    protonet = fmaml.InnerLoop(0.4, num_steps=0, head_init="prototypes")
    protomaml = protonet.replace(num_steps=1)
    train("ProtoNet", protonet, iterations, num_tasks, hidden)
    accuracy = train("ProtoMAML", protomaml, iterations, num_tasks, hidden)
    print(f"final accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
