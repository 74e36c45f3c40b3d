"""Experiment: the inner loops of all tasks vmapped, the query passes one task at a time.

A second-order MAML meta-step split in three phases, exact by the chain rule:

1. ``adapted = vmap(inner_loop, in_dims=(None, 0, 0))(params, support)``: every task's inner
   loop at once. At the first step all tasks share ``params``, so each support convolution is
   one plain convolution over all tasks' images (what the tasks share is computed once).
2. For each task, one at a time (on 1 or 2 worker threads, each with its own model copy): the
   query loss at the task's adapted parameters, detached, and its gradient ``g_t`` with respect
   to them: torch's plain kernels, the fastest way on a CPU (``benchmarks/README.md``).
3. One backward through phase 1's graph with the stacked ``g_t`` as cotangents: the
   second-order terms of all tasks at once.

The script checks the meta-gradient against fmaml's per-task loop in float64, then times it
against fmaml's auto strategy, learn2learn and higher in interleaved rounds, in one process.

    python benchmarks/two_phase.py --settings omniglot miniimagenet
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from fmaml.bench import (  # noqa: E402
    SETTINGS,
    build,
    describe_device,
    interleaved_rates,
    make_step,
)


def two_phase_step(problem, workers: int):
    """``step()`` -> the second-order meta-gradient (in the order of ``problem.params``)."""
    setting = problem.setting
    models = [problem.model] + [copy.deepcopy(problem.model) for _ in range(workers - 1)]
    params = problem.params
    names = list(params)
    (xs, ys), (xq, yq) = problem.tasks
    num_tasks = xs.shape[0]

    def loss(p, x, y):
        return F.cross_entropy(functional_call(models[0], p, (x,)), y)

    def inner_loop(p, x, y):
        adapted = p
        for _ in range(setting.inner_steps):
            g = grad(loss)(adapted, x, y)
            adapted = {k: adapted[k] - setting.inner_lr * g[k] for k in adapted}
        return adapted

    def step():
        adapted = vmap(inner_loop, in_dims=(None, 0, 0))(params, xs, ys)

        def query_grads(tasks, model):
            out = []
            for t in tasks:
                fast = {k: adapted[k][t].detach().requires_grad_() for k in names}
                value = F.cross_entropy(functional_call(model, fast, (xq[t],)), yq[t])
                out.append((t, torch.autograd.grad(value / num_tasks, list(fast.values()))))
            return out

        if workers == 1:
            results = query_grads(range(num_tasks), models[0])
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(max(1, threads // workers))
            try:
                with ThreadPoolExecutor(workers) as pool:
                    futures = [
                        pool.submit(query_grads, range(w, num_tasks, workers), models[w])
                        for w in range(workers)
                    ]
                    results = [r for f in futures for r in f.result()]
            finally:
                torch.set_num_threads(threads)
        results.sort(key=lambda r: r[0])
        cotangents = [torch.stack([r[1][i] for r in results]) for i in range(len(names))]
        return torch.autograd.grad(
            [adapted[k] for k in names], [params[k] for k in names], grad_outputs=cotangents
        )

    return step


def check(name: str) -> float:
    """Largest deviation from fmaml's per-task loop, relative to the gradient's largest entry."""
    problem = build(SETTINGS[name], dtype=torch.float64, num_tasks=4)
    reference = make_step("loop", problem, False)()
    ours = two_phase_step(problem, 2)()
    scale = max(r.abs().max().item() for r in reference)
    return max((r - o).abs().max().item() for r, o in zip(reference, ours, strict=True)) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["omniglot", "miniimagenet"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(f"device: {describe_device('cpu')}; torch {torch.__version__}, second order")
    for name in args.settings:
        print(f"{name}: float64 deviation from the per-task loop {check(name):.1e}")
        problem = build(SETTINGS[name])
        steps = {
            "two-phase, 1 worker": two_phase_step(problem, 1),
            "two-phase, 2 workers": two_phase_step(problem, 2),
            "fmaml (auto)": make_step("fmaml", problem, False),
        }
        for peer in ("learn2learn", "higher"):
            try:
                steps[peer] = make_step(peer, problem, False)
            except ImportError:
                print(f"  {peer}: not installed, skipped")
        rates = interleaved_rates(steps, args.rounds, args.seconds)
        peers = [max(rates[p]) for p in ("learn2learn", "higher") if p in rates]
        for label, values in rates.items():
            versus = f"  {max(values) / max(peers):.2f}x the fastest peer" if peers else ""
            rounds = " ".join(f"{v:.3f}" for v in values)
            print(f"  {label:22s} best {max(values):.3f} steps/s (rounds: {rounds}){versus}")


if __name__ == "__main__":
    main()
