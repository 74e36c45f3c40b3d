"""Peak memory against inner steps: fmaml's memory plans beside learn2learn and higher.

Second-order MAML, conv4-32 on 84x84 images (mini-ImageNet 5-way 1-shot, 15 queries per
class), meta-batch 4, on random data. Each (implementation, inner steps) runs one meta-step
in a fresh Python process; the figure is the growth of its peak resident memory (VmHWM,
reset through ``/proc/self/clear_refs`` once the model, the data and the imports are in
place) over the process at rest, with the allocator as it is (what a user sees; set
``MALLOC_MMAP_THRESHOLD_=65536`` to make glibc return freed tensors at once, at a large cost
in time). fmaml's rows also give :func:`fmaml.plan_memory`'s estimate.

    python benchmarks/memory_steps.py --steps 1 5 10 25 50 100 --json results/memory-steps.jsonl

Linux only (``/proc``). The peers must be installed (``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import fmaml  # noqa: E402
from fmaml.bench import SETTINGS, build, describe_device, make_step, run_json_job  # noqa: E402

IMPLS = {
    "fmaml (steps recomputed)": {"chunk_size": 1, "checkpoint": True},
    "fmaml (steps kept)": {"chunk_size": 1},
    "learn2learn": None,
    "higher": None,
}


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def worker() -> None:
    """One meta-step of the job on standard input; prints its row as JSON."""
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job["threads"])
    setting = dataclasses.replace(SETTINGS["miniimagenet"], inner_steps=job["steps"])
    problem = build(setting)
    strategy = IMPLS[job["impl"]]
    impl = "fmaml" if strategy is not None else job["impl"]
    step = make_step(impl, problem, False, None if strategy is None else fmaml.Strategy(**strategy))
    row = {"impl": job["impl"], "steps": job["steps"]}
    if strategy is not None:
        inner = fmaml.InnerLoop(setting.inner_lr, num_steps=setting.inner_steps)
        plan = fmaml.plan_memory(
            problem.loss_fn,
            problem.params,
            problem.tasks,
            inner,
            strategy=fmaml.Strategy(**strategy),
        )
        row["estimate_mb"] = round(plan.estimate / 1e6, 1)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak resident memory starts again from here
    rest = _status("VmRSS:")
    step()
    row["peak_growth_mb"] = round((_status("VmHWM:") - rest) / 1e6, 1)
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 25, 50, 100])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also append the rows to this JSON-lines file")
    args = parser.parse_args()
    print(f"# {describe_device('cpu')}, {args.threads} threads, torch {torch.__version__}")
    rows = []
    for steps in args.steps:
        for impl in args.impls:
            job = {"impl": impl, "steps": steps, "threads": args.threads}
            try:
                row = run_json_job(
                    [sys.executable, os.path.abspath(__file__), "--worker"],
                    job,
                    impl,
                )
            except RuntimeError as error:  # out of memory, or a peer missing: say so
                row = {**job, "error": str(error).splitlines()[-1][:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as out:
                    out.write(json.dumps(row) + "\n")
    impls = [i for i in args.impls if any(r["impl"] == i for r in rows)]
    print("\n| inner steps | " + " | ".join(impls) + " |")
    print("|---|" + "---|" * len(impls))
    for steps in args.steps:
        cells = []
        for impl in impls:
            row = next((r for r in rows if r["impl"] == impl and r["steps"] == steps), {})
            if not row or "error" in row:
                cells.append("not run" if not row else "failed")
                continue
            cell = f"{row['peak_growth_mb']:.0f} MB"
            if "estimate_mb" in row:
                cell += f" (est. {row['estimate_mb']:.0f})"
            cells.append(cell)
        print(f"| {steps} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
