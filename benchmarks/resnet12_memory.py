"""Peak memory of one second-order meta-step of ResNet-12, with and without recomputed inner steps.

mini-ImageNet-shaped tasks (5-way 1-shot, 15 query per class, 84x84x3, random pixels) and
``fmaml.nn.resnet12``; each setting (strategy x inner steps) runs in a fresh Python process:

1. build the model, its parameters and the meta-batch; one warm-up meta-step on a single
   16x16 task with the same strategy (imports, lazy initialisation: ~150 MB of modules
   ``torch.func`` loads on first use are not the meta-step's);
2. on a CPU: reset the process's peak resident memory (``/proc/self/clear_refs``), read the
   resident memory, run one meta-step (``fmaml.value_and_grad`` of
   every parameter), and report the peak minus the memory before it. The child runs with
   ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns every freed tensor above 64 KiB to
   the OS at once: resident memory then follows the live tensors, and a block freed and
   kept by the allocator is not counted as in use (or missed when reused). It makes each
   allocation a system call and its pages fault in each time: the seconds reported are
   slower than a normal process's (about 2x for the CPU result in ``benchmarks/results``).
   On CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step.

The two strategies compared are ``Strategy(chunk_size=1)`` (one task at a time, the graph of
every inner step kept for the backward) and ``Strategy(chunk_size=1, checkpoint=True)`` (only
each step's parameters kept, the step recomputed in the backward). Both give the same loss
and meta-gradient (checked here: the loss and the gradient's norm are printed; exactly in
``tests/test_resnet12.py``).

    python benchmarks/resnet12_memory.py --num-tasks 1 --threads 1   # 5 min on 2 CPU cores
    python benchmarks/resnet12_memory.py --widths 16 40 80 160 --num-tasks 2 --threads 1
    python benchmarks/resnet12_memory.py --device cuda --num-tasks 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fmaml  # noqa: E402
from fmaml.bench import describe_device, run_json_job  # noqa: E402
from fmaml.engine.strategy import Strategy  # noqa: E402

STRATEGIES = {
    "kept": Strategy(chunk_size=1),
    "recomputed": Strategy(chunk_size=1, checkpoint=True),
}


def tasks_of(num_tasks, num_ways, num_shots, num_query, size, device, seed=0):
    """Random mini-ImageNet-shaped tasks: ``support [T, ways*shots, 3, size, size]``."""
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.randn(num_tasks, n, 3, size, size, generator=g).to(device)

    def labels(per_class):
        return torch.arange(num_ways).repeat(per_class).expand(num_tasks, -1).to(device)

    return fmaml.Task(
        support=(images(num_ways * num_shots), labels(num_shots)),
        query=(images(num_ways * num_query), labels(num_query)),
    )


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"resnet12_memory: no {field} in /proc/self/status")


def measure(job: dict) -> dict:
    """One setting in this process: ``{"peak_mb", "seconds", "loss", "grad_norm", ...}``."""
    device = job["device"]
    cuda = device.startswith("cuda")
    if job["threads"] is not None:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model = fmaml.nn.resnet12(job["num_ways"], 3, tuple(job["widths"])).to(device)
    params = fmaml.params_of(model)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    strategy = STRATEGIES[job["strategy"]]
    inner = fmaml.InnerLoop(0.01, num_steps=job["num_steps"])

    def step(tasks):
        loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=strategy)
        return loss, list(grads.params.values())

    sizes = (job["num_ways"], job["num_shots"], job["num_query"])
    step(tasks_of(1, *sizes, 16, device, seed=1))  # warm-up: imports, lazy initialisation
    tasks = tasks_of(job["num_tasks"], *sizes, job["image_size"], device)
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
    param_mb = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
    return {
        **job,
        # resident memory is counted lazily (per-thread counters, synced now and then): a
        # step that needs no new memory can read a little below `before`; it grew by 0 MB
        "peak_mb": max(0.0, peak - before),
        "before_mb": before,
        "param_mb": param_mb,
        "seconds": seconds,
        "loss": loss.item(),
        "grad_norm": torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item(),
        # the gradients themselves, for a test to compare the strategies element by element
        **({"grads": [g.flatten().tolist() for g in grads]} if job.get("keep_grads") else {}),
    }


def run_child(job: dict) -> dict:
    """:func:`measure` in a fresh Python process (glibc returns freed tensors at once)."""
    return run_json_job(
        [sys.executable, os.path.abspath(__file__), "--child"],
        job,
        f"resnet12_memory: the setting {job}",
        env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"),
    )


def run(
    *,
    widths=(64, 160, 320, 640),
    num_tasks=2,
    steps=(1, 3, 5),
    image_size=84,
    num_ways=5,
    num_shots=1,
    num_query=15,
    device="cpu",
    threads=None,
    keep_grads=False,
) -> list[dict]:
    """Every (inner steps, strategy) setting, each in its own process; ``keep_grads``: each
    row also holds every gradient (``"grads"``, flattened; small models only)."""
    rows = []
    for num_steps in steps:
        for name in STRATEGIES:
            job = {
                "strategy": name,
                "num_steps": num_steps,
                "widths": list(widths),
                "num_tasks": num_tasks,
                "image_size": image_size,
                "num_ways": num_ways,
                "num_shots": num_shots,
                "num_query": num_query,
                "device": device,
                "threads": threads,
                "keep_grads": keep_grads,
            }
            rows.append(run_child(job))
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table: peak memory and time of each setting, and the saving."""
    lines = [
        "| inner steps | steps kept: peak MB | recomputed: peak MB | saved | "
        "kept: s | recomputed: s | same loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {(r["num_steps"], r["strategy"]): r for r in rows}
    for num_steps in sorted({r["num_steps"] for r in rows}):
        kept, recomputed = by[num_steps, "kept"], by[num_steps, "recomputed"]
        same = abs(kept["loss"] - recomputed["loss"]) <= 1e-5 * abs(kept["loss"]) and abs(
            kept["grad_norm"] - recomputed["grad_norm"]
        ) <= 1e-4 * abs(kept["grad_norm"])
        saved = f"{1 - recomputed['peak_mb'] / kept['peak_mb']:.0%}" if kept["peak_mb"] > 0 else "-"
        lines.append(
            f"| {num_steps} | {kept['peak_mb']:.0f} | {recomputed['peak_mb']:.0f} | "
            f"{saved} | {kept['seconds']:.1f} | {recomputed['seconds']:.1f} | "
            f"{'yes' if same else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--widths", type=int, nargs=4, default=[64, 160, 320, 640])
    parser.add_argument("--num-tasks", type=int, default=2, help="meta-batch size")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--num-query", type=int, default=15, help="per class")
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
        widths=args.widths,
        num_tasks=args.num_tasks,
        steps=args.steps,
        image_size=args.image_size,
        num_query=args.num_query,
        device=args.device,
        threads=args.threads,
    )
    first = rows[0]
    print(
        f"# resnet12 widths {tuple(args.widths)} ({first['param_mb']:.1f} MB of float32 "
        f"parameters), {args.num_tasks} tasks of 5-way 1-shot, {args.num_query} query per "
        f"class, {args.image_size}x{args.image_size}x3; second order, inner_lr 0.01"
    )
    print(f"# device: {describe_device(args.device)}; {time.strftime('%Y-%m-%d %H:%M UTC', start)}")
    kind = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(
        f"# peak MB: {kind} during one meta-step minus the memory before it, fresh process "
        "per setting; s: that step's seconds"
    )
    command = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# command: python benchmarks/resnet12_memory.py {command}".rstrip())
    print(table(rows))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
