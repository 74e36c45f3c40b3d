"""Second-order MAML with many inner steps in bounded memory: a plan for a memory budget.

`fmaml.plan_memory` measures one task of the meta-batch and picks the fastest strategy whose
estimated peak fits the budget: fewer tasks at a time, then recomputed inner steps
(`fmaml.Strategy(chunk_size=1, checkpoint=True)` keeps only each step's parameters, and the
backward pass recomputes each step). What is computed does not change: the meta-gradient
equals the default strategy's and the definition's (`fmaml.meta_loss` with plain autograd).

    python examples/memory_bounded.py           # conv4-32, 10 inner steps, 4 tasks
    python examples/memory_bounded.py --tiny
"""

import argparse

import torch
import torch.nn.functional as F

import fmaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps, a small network")
    args = parser.parse_args()
    num_steps, num_tasks, hidden, side = (3, 2, 4, 16) if args.tiny else (10, 4, 32, 28)

    generator = torch.Generator().manual_seed(0)
    model = fmaml.nn.seeded(
        lambda: fmaml.nn.conv4(num_classes=5, in_channels=1, hidden=hidden, image_size=side),
        generator,
    )
    model = model.double()  # compare gradients in float64
    params = fmaml.params_of(model)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)

    images = dict(dtype=torch.float64, generator=generator)
    xs = torch.rand(num_tasks, 5, 1, side, side, **images)
    xq = torch.rand(num_tasks, 25, 1, side, side, **images)
    ys, yq = torch.arange(5).repeat(num_tasks, 1), torch.arange(5).repeat(num_tasks, 5)
    tasks = fmaml.Task(support=(xs, ys), query=(xq, yq))
    inner = fmaml.InnerLoop(0.1, num_steps=num_steps)  # second order

    one_vmap = fmaml.plan_memory(loss_fn, params, tasks, inner, strategy=fmaml.Strategy())
    one_task = fmaml.Strategy(chunk_size=1, checkpoint=True)
    least = fmaml.plan_memory(loss_fn, params, tasks, inner, strategy=one_task)
    budget = max(least.estimate, one_vmap.estimate // 2)  # bytes: half of one vmap, if it can
    plan = fmaml.plan_memory(loss_fn, params, tasks, inner, memory_budget=budget)
    print(f"one vmap over all tasks: about {one_vmap.estimate / 1e6:.0f} MB")
    print(f"plan: {plan}")
    loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=plan.strategy)
    default_loss, default_grads = fmaml.value_and_grad(loss_fn, params, tasks, inner)

    definition = fmaml.meta_loss(loss_fn, params, tasks, inner)
    gradients = torch.autograd.grad(definition, list(params.values()))
    expected = dict(zip(params, gradients, strict=True))

    for name in params:
        torch.testing.assert_close(grads.params[name], default_grads.params[name])
        torch.testing.assert_close(grads.params[name], expected[name])
    scale = max(g.abs().max().item() for g in expected.values())
    worst = max((grads.params[k] - expected[k]).abs().max().item() for k in params) / scale
    torch.testing.assert_close(loss, default_loss)
    print(f"{num_steps} inner steps, second order, {num_tasks} tasks")
    print(f"planned = default strategy = definition; largest difference {worst:.1e}")
    print(f"final meta-loss: {loss.item():.6f}")


if __name__ == "__main__":
    main()
