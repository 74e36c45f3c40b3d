"""How fast could any MAML implementation run a benchmark setting here, with torch's kernels?

Every exact MAML meta-step (any library, any order) has to run, for each task, the query set
forward and backward at that task's adapted weights. This script times only that part, with
torch's own kernels (``nn.BatchNorm2d`` with batch statistics, as learn2learn and higher use)
and no meta-learning around it: no inner loop, no second-order terms, nothing kept between
tasks. Its rate is an upper bound on the meta-steps/s of any implementation built on these
kernels on this machine. For first order the script times the first-order pass instead: the
support set forward and backward once per inner step, then the query set, which is all of
first-order MAML's work and part of second order's.

Each pass is timed in three arrangements of the same FLOPs:

  one-batch        all tasks' query images in one batch (BatchNorm over all of them), torch's
                   intra-op threads: the best case for the kernels, one large op each
  per-task         one task after another, torch's intra-op threads (what the peers do)
  per-task-2-workers  one task at a time on each of 2 threads with 1 intra-op thread each
                   (what fmaml's auto strategy does on a 2-core CPU)

and learn2learn's and fmaml's real meta-steps are timed in the same run (``--peers``).

    python benchmarks/ceiling.py --settings omniglot miniimagenet --json results/ceiling.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fmaml.bench import (  # noqa: E402
    SETTINGS,
    build,
    describe_device,
    interleaved_rates,
    make_step,
    torch_batchnorm_twin,
)


def _pass(model, leaves, x, y) -> list:
    """Forward and backward of one batch: the gradients of its loss."""
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), leaves))


def _add(total: list | None, grads: list) -> list:
    return grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]


def passes(problem, first_order: bool) -> dict:
    """``arrangement -> step()`` for the query pass (or the first-order pass); each step
    returns the sum of the gradients it computed (the weights are not moved: the support
    passes of the first-order pass all run at the same weights)."""
    model = torch_batchnorm_twin(problem)
    leaves = list(model.parameters())
    (xs, ys), (xq, yq) = problem.tasks
    num_tasks, steps = xq.shape[0], problem.setting.inner_steps
    tasks = [((xs[t], ys[t]), (xq[t], yq[t])) for t in range(num_tasks)]

    def per_task(indices) -> list:
        total = None
        for t in indices:
            (x, y), query = tasks[t]
            for _ in range(steps if first_order else 0):
                total = _add(total, _pass(model, leaves, x, y))
            total = _add(total, _pass(model, leaves, *query))
        return total

    def one_batch() -> list:
        total = None
        for _ in range(steps if first_order else 0):
            total = _add(total, _pass(model, leaves, xs.flatten(0, 1), ys.flatten()))
        return _add(total, _pass(model, leaves, xq.flatten(0, 1), yq.flatten()))

    def two_workers() -> list:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=2) as pool:
                halves = [range(0, num_tasks, 2), range(1, num_tasks, 2)]
                futures = [pool.submit(per_task, half) for half in halves if half]
                results = [done.result() for done in futures]
        finally:
            torch.set_num_threads(threads)
        total = None
        for grads in results:
            total = _add(total, grads)
        return total

    return {
        "one-batch": one_batch,
        "per-task": lambda: per_task(range(num_tasks)),
        "per-task-2-workers": two_workers,
    }


def rate(step, min_seconds: float, rounds: int) -> float:
    """Steps per second: the best of ``rounds`` means over at least ``min_seconds`` each."""
    return max(interleaved_rates({"step": step}, rounds, min_seconds)["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["omniglot", "miniimagenet"])
    parser.add_argument("--orders", nargs="+", default=["second", "first"])
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peers", nargs="*", default=["learn2learn", "higher", "fmaml"])
    parser.add_argument("--json", default=None, help="append one JSON row per setting here")
    args = parser.parse_args()
    device = describe_device("cpu")
    print(f"device: {device}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    for name in args.settings:
        problem = build(SETTINGS[name])
        for order in args.orders:
            first_order = order == "first"
            row = {"setting": name, "order": order, "device": device, "bounds": {}, "steps": {}}
            what = "first-order pass" if first_order else "query pass"
            for arrangement, step in passes(problem, first_order).items():
                row["bounds"][arrangement] = rate(step, args.min_seconds, args.rounds)
            for impl in args.peers:
                try:
                    step = make_step(impl, problem, first_order)
                except ImportError as error:
                    print(f"  {impl}: not installed ({error})")
                    continue
                row["steps"][impl] = rate(step, args.min_seconds, args.rounds)
            fastest_peer = max(
                (row["steps"][p] for p in ("learn2learn", "higher") if p in row["steps"]),
                default=None,
            )
            print(f"{name}, {order} order; upper bounds from the {what} alone (steps/s):")
            for arrangement, bound in row["bounds"].items():
                versus = f" = {bound / fastest_peer:.2f}x the fastest peer" if fastest_peer else ""
                print(f"  {arrangement:20s} {bound:8.3f}{versus}")
            for impl, value in row["steps"].items():
                print(f"  meta-step {impl:12s} {value:8.3f}")
            if args.json:
                with open(args.json, "a") as out:
                    out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
