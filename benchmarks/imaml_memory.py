"""Peak memory of one meta-gradient of conv4: iMAML (implicit, constant in the inner steps)
against second-order MAML (every inner step kept for the backward).

Omniglot-shaped tasks (20-way 1-shot, 5 query per class, 28x28x1, random pixels) and
``fmaml.nn.conv4``; each setting (algorithm x inner steps) runs in a fresh Python process and
is measured as in ``benchmarks/resnet12_memory.py``: one warm-up meta-step on a single task
(imports, lazy initialisation), then on a CPU the peak resident memory of one meta-step
(``fmaml.value_and_grad`` of every parameter) minus the resident
memory before it, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the
resident set at once; on CUDA ``torch.cuda.max_memory_allocated`` minus the memory before.

Both run one task at a time (``Strategy(chunk_size=1)``, the CPU default for convolutions).
MAML differentiates through its inner steps, so its memory grows with them; iMAML runs its
inner steps without a graph and keeps, per task, one support backward's graph for the
Hessian-vector products of conjugate gradient (``fmaml.imaml_loss``).

    python benchmarks/imaml_memory.py --threads 1           # about 30 s of one CPU core
    python benchmarks/imaml_memory.py --device cuda --num-tasks 8
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from resnet12_memory import _status_mb  # noqa: E402

import fmaml  # noqa: E402
from fmaml.bench import describe_device, run_json_job  # noqa: E402

ALGORITHMS = ("maml", "imaml")


def tasks_of(num_tasks, num_ways, num_shots, num_query, size, device, seed=0):
    """Random Omniglot-shaped tasks: ``support [T, ways*shots, 1, size, size]``."""
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.randn(num_tasks, n, 1, size, size, generator=g).to(device)

    def labels(per_class):
        return torch.arange(num_ways).repeat(per_class).expand(num_tasks, -1).to(device)

    return fmaml.Task(
        support=(images(num_ways * num_shots), labels(num_shots)),
        query=(images(num_ways * num_query), labels(num_query)),
    )


def measure(job: dict) -> dict:
    """One setting in this process: ``{"peak_mb", "seconds", "loss", "grad_norm", ...}``."""
    device = job["device"]
    cuda = device.startswith("cuda")
    if job["threads"] is not None:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model = fmaml.nn.conv4(job["num_ways"], 1, job["hidden"], job["image_size"]).to(device)
    params = fmaml.params_of(model)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    objective = (
        fmaml.IMAML(lam=job["lam"], cg_steps=job["cg_steps"])
        if job["algorithm"] == "imaml"
        else "query"
    )
    inner = fmaml.InnerLoop(job["inner_lr"], num_steps=job["num_steps"])
    strategy = fmaml.Strategy(chunk_size=1)

    def step(tasks):
        loss, grads = fmaml.value_and_grad(
            loss_fn, params, tasks, inner, strategy=strategy, objective=objective
        )
        return loss, list(grads.params.values())

    sizes = (job["num_ways"], job["num_shots"], job["num_query"], job["image_size"], device)
    step(tasks_of(1, *sizes, seed=1))  # warm-up: imports, lazy initialisation
    tasks = tasks_of(job["num_tasks"], *sizes)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak resident memory (VmHWM) to the current one
        before = _status_mb("VmRSS")
    start = time.perf_counter()
    loss, grads = step(tasks)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")
    return {
        **job,
        # resident memory is counted lazily (per-thread counters, synced now and then): a
        # step that needs no new memory can read a little below `before`; it grew by 0 MB
        "peak_mb": max(0.0, peak - before),
        "before_mb": before,
        "seconds": seconds,
        "loss": loss.item(),
        "grad_norm": torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item(),
        "grad_sha256": digest(grads),
    }


def digest(grads) -> str:
    """The SHA-256 of every gradient's bytes: two runs compared exactly, not to a tolerance."""
    return hashlib.sha256(b"".join(g.detach().cpu().numpy().tobytes() for g in grads)).hexdigest()


def run_child(job: dict) -> dict:
    """:func:`measure` in a fresh Python process (glibc returns freed tensors at once)."""
    return run_json_job(
        [sys.executable, os.path.abspath(__file__), "--child"],
        job,
        f"imaml_memory: the setting {job}",
        env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"),
    )


def run(
    *,
    steps=(1, 5, 20),
    num_tasks=2,
    num_ways=20,
    num_shots=1,
    num_query=5,
    hidden=64,
    image_size=28,
    inner_lr=0.1,
    lam=1.0,
    cg_steps=5,
    device="cpu",
    threads=None,
) -> list[dict]:
    """Every (inner steps, algorithm) setting, each in its own process."""
    rows = []
    for num_steps in steps:
        for algorithm in ALGORITHMS:
            job = {
                "algorithm": algorithm,
                "num_steps": num_steps,
                "num_tasks": num_tasks,
                "num_ways": num_ways,
                "num_shots": num_shots,
                "num_query": num_query,
                "hidden": hidden,
                "image_size": image_size,
                "inner_lr": inner_lr,
                "lam": lam,
                "cg_steps": cg_steps,
                "device": device,
                "threads": threads,
            }
            rows.append(run_child(job))
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table: each algorithm's peak memory and time per number of inner steps."""
    lines = [
        "| inner steps | MAML: peak MB | iMAML: peak MB | MAML: s | iMAML: s |",
        "| --- | --- | --- | --- | --- |",
    ]
    by = {(r["num_steps"], r["algorithm"]): r for r in rows}
    for num_steps in sorted({r["num_steps"] for r in rows}):
        maml, imaml = by[num_steps, "maml"], by[num_steps, "imaml"]
        lines.append(
            f"| {num_steps} | {maml['peak_mb']:.0f} | {imaml['peak_mb']:.0f} | "
            f"{maml['seconds']:.2f} | {imaml['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--num-tasks", type=int, default=2, help="meta-batch size")
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64, help="conv4 filters")
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--cg-steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(sys.stdin.read()))))
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.gmtime()
    rows = run(
        steps=args.steps,
        num_tasks=args.num_tasks,
        num_ways=args.ways,
        hidden=args.hidden,
        lam=args.lam,
        cg_steps=args.cg_steps,
        device=args.device,
        threads=args.threads,
    )
    print(
        f"# conv4 hidden {args.hidden}, {args.num_tasks} tasks of {args.ways}-way 1-shot, "
        f"5 query per class, 28x28x1; one task at a time; MAML second order; iMAML lam "
        f"{args.lam}, {args.cg_steps} CG steps; inner_lr 0.1"
    )
    print(f"# device: {describe_device(args.device)}; {time.strftime('%Y-%m-%d %H:%M UTC', start)}")
    kind = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(
        f"# peak MB: {kind} during one meta-step minus the memory before it, fresh process "
        "per setting; s: that step's seconds (slowed by the malloc setting on a CPU)"
    )
    command = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# command: python benchmarks/imaml_memory.py {command}".rstrip())
    print(table(rows))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
