"""MAML on sinusoid regression with the library alone (Finn et al. 2017, section 5.1).

A 1-40-40-1 MLP, K=10 support points per task, one inner step at 0.01, meta-batch 25,
Adam at 1e-3 on the exact second-order meta-gradient; then the MSE on 600 held-out tasks
after 0, 1, ... 10 inner steps.

    python examples/sinusoid_maml.py            # 2,000 iterations, under a minute on a CPU
    python examples/sinusoid_maml.py --tiny     # a few iterations (what the tests run)
"""

import argparse

import torch
import torch.nn.functional as F

import fmaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few iterations, a small batch")
    args = parser.parse_args()
    iterations, num_tasks, num_episodes = (5, 4, 20) if args.tiny else (2000, 25, 600)

    model = fmaml.nn.seeded(fmaml.nn.mlp, torch.Generator().manual_seed(0))  # 1-40-40-1, ReLU
    params = fmaml.params_of(model)  # {name: leaf tensor}
    loss_fn = fmaml.supervised_loss(model, F.mse_loss)  # (params, (x, y)) -> scalar
    inner = fmaml.InnerLoop(0.01, num_steps=1)
    outer = torch.optim.Adam(params.values(), lr=1e-3)

    tasks = fmaml.tasks.SinusoidTasks(num_shots=10)
    generator = torch.Generator().manual_seed(0)
    for iteration in range(1, iterations + 1):
        batch = tasks.sample(num_tasks, generator)  # a Task with a leading task axis
        loss, grads = fmaml.value_and_grad(loss_fn, params, batch, inner)
        outer.zero_grad()
        for name, p in params.items():
            p.grad = grads.params[name]
        outer.step()
        if iteration % 500 == 0 or iteration == iterations:
            print(f"iteration {iteration}: meta-loss {loss.item():.4f}")

    # Test as the paper does: K=5, up to 10 steps at the training rate, fresh query points.
    test_tasks = fmaml.tasks.SinusoidTasks(num_shots=5, num_query=100)
    test_generator = torch.Generator().manual_seed(1)
    episodes = [test_tasks.sample(num_episodes // 4, test_generator) for _ in range(4)]
    mse = fmaml.evaluate(loss_fn, loss_fn, params, episodes, inner.replace(num_steps=10))
    for steps in (1, 5, 10):
        mean, ci95 = fmaml.mean_ci95(mse[:, steps])
        print(f"K=5, MSE after {steps:2d} inner steps: {mean:.3f} ± {ci95:.3f}")
    print(f"final MSE after 10 steps: {mse[:, 10].mean().item():.4f}")


if __name__ == "__main__":
    main()
