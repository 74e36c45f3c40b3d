"""ANIL (Raghu et al. 2020) as a partition of the parameters: only the head adapts.

The parameters of `fmaml.nn.conv4` are named `body.*` and `head.*`. ANIL adapts the keys
`adapt_keys` selects and holds the rest fixed in the inner loop; the body still gets its
meta-gradient through the query loss. `fmaml.partition` splits a parameter dict the same way,
here to show which tensors adapt and that the frozen ones come back unchanged.

    python examples/anil_partition.py           # 200 iterations on random 5-way images
    python examples/anil_partition.py --tiny
"""

import argparse

import torch
import torch.nn.functional as F

import fmaml


def head_keys(name: str) -> bool:
    return name.startswith("head.")


def random_tasks(num_tasks: int, generator: torch.Generator) -> fmaml.Task:
    """5-way 1-shot tasks of random 28x28 images, 5 query images per class."""
    xs = torch.rand(num_tasks, 5, 1, 28, 28, generator=generator)
    xq = torch.rand(num_tasks, 25, 1, 28, 28, generator=generator)
    ys, yq = torch.arange(5).repeat(num_tasks, 1), torch.arange(5).repeat(num_tasks, 5)
    return fmaml.Task(support=(xs, ys), query=(xq, yq))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few iterations, a small batch")
    args = parser.parse_args()
    iterations, num_tasks, hidden = (3, 2, 8) if args.tiny else (200, 8, 32)

    generator = torch.Generator().manual_seed(0)
    model = fmaml.nn.seeded(
        lambda: fmaml.nn.conv4(num_classes=5, in_channels=1, hidden=hidden, image_size=28),
        generator,
    )
    params = fmaml.params_of(model)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)

    fast, frozen = fmaml.partition(params, head_keys)
    print(f"adapted in the inner loop: {sorted(fast)}")
    print(f"held fixed: {len(frozen)} tensors of the body")

    anil = fmaml.InnerLoop(0.4, num_steps=1, adapt_keys=head_keys)
    boil = anil.replace(adapt_keys=lambda name: not head_keys(name))  # BOIL: the complement

    # One task: the frozen tensors come back as they went in; the head moves.
    task = random_tasks(1, generator)
    support = (task.support[0][0], task.support[1][0])
    adapted = fmaml.adapt(loss_fn, params, support, anil)
    assert all(adapted[k] is params[k] or torch.equal(adapted[k], params[k]) for k in frozen)
    moved = sum((adapted[k] - params[k]).norm().item() for k in fast)
    print(f"head moved by {moved:.4f} in one inner step")

    outer = torch.optim.Adam(params.values(), lr=1e-3)
    for _ in range(iterations):
        tasks = random_tasks(num_tasks, generator)
        loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, anil)
        outer.zero_grad()
        for name, p in params.items():
            p.grad = grads.params[name]
        outer.step()
    body_grad = sum(grads.params[k].norm().item() for k in frozen)
    print(f"the body's meta-gradient is not zero: {body_grad:.2e}")

    boil_loss, _ = fmaml.value_and_grad(loss_fn, params, random_tasks(num_tasks, generator), boil)
    print(f"BOIL meta-loss on a new batch: {boil_loss.item():.4f}")
    print(f"final ANIL meta-loss: {loss.item():.4f}")


if __name__ == "__main__":
    main()
