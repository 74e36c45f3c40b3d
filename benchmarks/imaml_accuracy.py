"""How close iMAML's implicit meta-gradient is to the derivative of the inner loop it stands
for, on the sinusoid MLP at its initialisation (float64).

For each ``(lam, steps, lr)`` it compares, on one meta-batch of 25 sinusoid tasks (K=10):

- iMAML with 5 conjugate-gradient steps (the default) and with 50;
- the exact meta-gradient of the same finite inner loop: ``steps`` of gradient descent at
  ``lr`` on the support loss plus ``lam/2 ||phi - params||^2``, differentiated through every
  step (plain ``torch.autograd``, ``create_graph=True``; ``params`` is both the start and the
  anchor).

and prints the cosine between them and their norms. The implicit gradient is that derivative
only where the inner problem is solved and ``I + H/lam`` is positive definite (``H`` the
support loss's Hessian at the solution); where the MLP's Hessian has eigenvalues below
``-lam``, conjugate gradient does not converge and the two disagree.

    python benchmarks/imaml_accuracy.py                       # the README's settings, ~3 min
    python benchmarks/imaml_accuracy.py --setting 20,20,0.01  # lam,steps,lr
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

import fmaml

DEFAULT_SETTINGS = ["1,10,0.01", "5,20,0.01", "10,20,0.01", "10,40,0.01", "20,20,0.01"]


def unrolled_meta_loss(loss_fn, params, tasks, lam: float, steps: int, lr: float):
    """The meta-loss of the finite pulled inner loop, written out with torch.autograd."""
    num_tasks = tasks.support[0].shape[0]
    total = 0
    for t in range(num_tasks):
        support = (tasks.support[0][t], tasks.support[1][t])
        query = (tasks.query[0][t], tasks.query[1][t])
        fast = dict(params)
        for _ in range(steps):
            pull = sum(((fast[k] - params[k]) ** 2).sum() for k in fast)
            loss = loss_fn(fast, support) + 0.5 * lam * pull
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads, strict=True)}
        total = total + loss_fn(fast, query)
    return total / num_tasks


def compare(lam: float, steps: int, lr: float, seed: int = 0) -> dict:
    """Cosines and norms of the implicit (5 and 50 CG steps) and unrolled meta-gradients."""
    torch.manual_seed(seed)
    model = fmaml.nn.mlp(hidden=(40, 40)).double()
    loss_fn = fmaml.supervised_loss(model, F.mse_loss)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    tasks = fmaml.tasks.SinusoidTasks(num_shots=10).sample(
        25, torch.Generator().manual_seed(seed), dtype=torch.float64
    )

    def flat(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])

    implicit = {
        cg: flat(
            fmaml.meta_loss(
                loss_fn,
                params,
                tasks,
                fmaml.InnerLoop(lr, num_steps=steps),
                objective=fmaml.IMAML(lam=lam, cg_steps=cg),
            )
        )
        for cg in (5, 50)
    }
    exact = flat(unrolled_meta_loss(loss_fn, params, tasks, lam, steps, lr))

    def cos(a, b):
        return F.cosine_similarity(a, b, dim=0).item()

    return {
        "lam": lam,
        "steps": steps,
        "lr": lr,
        "cos_cg5_cg50": cos(implicit[5], implicit[50]),
        "cos_cg50_unrolled": cos(implicit[50], exact),
        "norm_cg5": implicit[5].norm().item(),
        "norm_cg50": implicit[50].norm().item(),
        "norm_unrolled": exact.norm().item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", action="append", help="lam,steps,lr (repeatable)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| lam | steps | lr | cos(CG 5, CG 50) | cos(CG 50, unrolled) | norms: CG 5/50, exact |")
    print("| --- | --- | --- | --- | --- | --- |")
    for setting in args.setting or DEFAULT_SETTINGS:
        lam, steps, lr = setting.split(",")
        r = compare(float(lam), int(steps), float(lr))
        print(
            f"| {r['lam']:g} | {r['steps']} | {r['lr']:g} | {r['cos_cg5_cg50']:.3f} | "
            f"{r['cos_cg50_unrolled']:.3f} | {r['norm_cg5']:.2f} / {r['norm_cg50']:.2f} / "
            f"{r['norm_unrolled']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
