"""Experiment: each task's whole second-order meta-gradient as one compiled graph, on a CPU.

One task at a time (no ``vmap``, so BatchNorm can be torch's fused kernel), the function
``params -> d query_loss(adapted(params)) / d params`` is written with ``torch.func.grad``
twice (inner and outer), so the inner loop, the query pass and every second-order term are
one functional graph, which ``torch.compile`` turns into fused CPU kernels. With
``--workers 2`` each of two threads has its own model copy and its own compiled function,
compiled while torch uses one intra-op thread (inductor's CPU kernels keep the thread count
they were compiled with).

The script checks the compiled meta-gradient against the same function run eagerly, in
float64, then times it against fmaml's auto strategy and learn2learn in interleaved rounds.

    python benchmarks/compiled_per_task.py --workers 2
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad  # noqa: E402

from fmaml.bench import (  # noqa: E402
    SETTINGS,
    build,
    describe_device,
    interleaved_rates,
    make_step,
    torch_batchnorm_twin,
)


def task_meta_gradient(model, setting):
    """``(params, xs, ys, xq, yq) -> {name: gradient}``: one task's second-order meta-gradient."""

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def meta_gradient(params, xs, ys, xq, yq):
        def query_loss(p):
            adapted = p
            for _ in range(setting.inner_steps):
                g = grad(loss)(adapted, xs, ys)
                adapted = {k: adapted[k] - setting.inner_lr * g[k] for k in adapted}
            return loss(adapted, xq, yq)

        return grad(query_loss)(params)

    return meta_gradient


def meta_step(problem, workers: int, compiled: bool):
    """``step()`` -> the meta-gradient of the whole meta-batch (a dict), and the compile time."""
    base = torch_batchnorm_twin(problem)
    params = {k: v.detach() for k, v in base.named_parameters()}
    (xs, ys), (xq, yq) = problem.tasks
    num_tasks = xs.shape[0]
    threads = torch.get_num_threads()
    functions = []
    begin = time.perf_counter()
    torch.set_num_threads(max(1, threads // workers))
    try:
        for _ in range(workers):
            fn = task_meta_gradient(copy.deepcopy(base), problem.setting)
            if compiled:
                fn = torch.compile(fn, dynamic=False)
                fn(params, xs[0], ys[0], xq[0], yq[0])  # compile now, at this thread count
            functions.append(fn)
    finally:
        torch.set_num_threads(threads)
    compile_s = time.perf_counter() - begin

    def share(w: int) -> dict:
        total = None
        for t in range(w, num_tasks, workers):
            g = functions[w](params, xs[t], ys[t], xq[t], yq[t])
            total = g if total is None else {k: total[k] + g[k] for k in g}
        return total

    def step() -> dict:
        torch.set_num_threads(max(1, threads // workers))
        try:
            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(share, range(workers)))
        finally:
            torch.set_num_threads(threads)
        return {k: sum(p[k] for p in parts) / num_tasks for k in parts[0]}

    return step, compile_s


def check(name: str = "omniglot", num_tasks: int = 2) -> float:
    """Compiled against eager, float64: largest deviation relative to the largest entry."""
    problem = build(SETTINGS[name], dtype=torch.float64, num_tasks=num_tasks)
    eager, _ = meta_step(problem, 1, compiled=False)
    compiled, _ = meta_step(problem, 1, compiled=True)
    a, b = eager(), compiled()
    return max((a[k] - b[k]).abs().max().item() for k in a) / max(
        v.abs().max().item() for v in a.values()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="omniglot")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(f"device: {describe_device('cpu')}; torch {torch.__version__}, second order")
    print(f"float64, compiled vs eager: relative deviation {check(args.setting):.1e}")
    problem = build(SETTINGS[args.setting])
    compiled, compile_s = meta_step(problem, args.workers, compiled=True)
    print(f"compiling {args.workers} copies took {compile_s:.1f} s")
    steps = {
        f"compiled, {args.workers} workers": compiled,
        "eager torch.func, 1 worker": meta_step(problem, 1, compiled=False)[0],
        "fmaml (auto)": make_step("fmaml", problem, False),
    }
    try:
        steps["learn2learn"] = make_step("learn2learn", problem, False)
    except ImportError:
        print("learn2learn: not installed, skipped")
    rates = interleaved_rates(steps, args.rounds, args.seconds)
    peer = max(rates["learn2learn"]) if "learn2learn" in rates else None
    for label, values in rates.items():
        versus = f"  {max(values) / peer:.2f}x learn2learn" if peer else ""
        rounds = " ".join(f"{v:.3f}" for v in values)
        print(f"  {label:28s} best {max(values):.3f} steps/s (rounds: {rounds}){versus}")


if __name__ == "__main__":
    main()
