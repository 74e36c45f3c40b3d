"""A loss that captures a learned temperature, meta-learned with the model.

The classifier's logits are divided by `exp(log_temp)` before the cross-entropy. `log_temp`
is not a model parameter: the loss captures it. `fmaml.value_and_grad(..., wrt=[log_temp])`
returns its exact meta-gradient in `grads.wrt`, through every inner step, on every strategy.
The check at the end compares it with plain autograd through `fmaml.meta_loss`, the
definition.

    python examples/learned_temperature.py      # 100 iterations on random 5-way tasks
    python examples/learned_temperature.py --tiny
"""

import argparse

import torch
import torch.nn.functional as F

import fmaml


def random_tasks(num_tasks: int, generator: torch.Generator) -> fmaml.Task:
    """5-way 2-shot tasks of 16 random features, 5 query examples per class."""
    xs, xq = (
        torch.randn(num_tasks, 10, 16, generator=generator),
        torch.randn(num_tasks, 25, 16, generator=generator),
    )
    ys, yq = torch.arange(5).repeat(num_tasks, 2), torch.arange(5).repeat(num_tasks, 5)
    return fmaml.Task(support=(xs, ys), query=(xq, yq))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few iterations, a small batch")
    args = parser.parse_args()
    iterations, num_tasks = (3, 2) if args.tiny else (100, 8)

    generator = torch.Generator().manual_seed(0)
    model = fmaml.nn.seeded(lambda: fmaml.nn.mlp(16, (32,), 5), generator)
    params = fmaml.params_of(model)
    log_temp = torch.zeros((), requires_grad=True)  # temperature exp(0) = 1 to start

    def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits / log_temp.exp(), y)

    loss_fn = fmaml.supervised_loss(model, criterion)
    inner = fmaml.InnerLoop(0.4, num_steps=2)
    outer = torch.optim.Adam([*params.values(), log_temp], lr=1e-2)

    for _ in range(iterations):
        tasks = random_tasks(num_tasks, generator)
        loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner, wrt=[log_temp])
        outer.zero_grad()
        for name, p in params.items():
            p.grad = grads.params[name]
        log_temp.grad = grads.wrt[0]
        outer.step()

    # The same gradient from the definition, by plain autograd.
    tasks = random_tasks(num_tasks, generator)
    _, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner, wrt=[log_temp])
    reference = fmaml.meta_loss(loss_fn, params, tasks, inner)
    (expected,) = torch.autograd.grad(reference, [log_temp])
    torch.testing.assert_close(grads.wrt[0], expected, rtol=1e-4, atol=1e-6)
    print(f"d meta-loss / d log_temp: {grads.wrt[0].item():.6f} (autograd: {expected.item():.6f})")
    print(f"temperature {log_temp.exp().item():.4f}")
    print(f"final meta-loss: {loss.item():.4f}")


if __name__ == "__main__":
    main()
