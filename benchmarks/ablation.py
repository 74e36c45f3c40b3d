"""What each of fmaml's CPU/GPU choices is worth: one meta-step timed under many strategies.

Each measurement runs in a fresh process (its own peak RSS), with the same torch threads as
this one. Prints one line per variant and, with ``--json FILE``, writes every row there.

    python benchmarks/ablation.py --settings omniglot miniimagenet --order second
    python benchmarks/ablation.py --threads 1 --settings sinusoid

Variants (``--variants``, default all that apply to the device):

  vmap-all          one vmap over all tasks (``strategy=None``)
  vmap-all-1-thread one vmap over all tasks, torch on one intra-op thread while it runs
  vmap-chunk-8      vmap over chunks of 8 tasks, gradients accumulated
  vmap-ops-bn       one vmap over all tasks, BatchNorm from plain mean/var ops (the old layer)
  vmap-half-workers-2  vmap over chunks of 16 tasks, 2 worker threads
  one-at-a-time     no vmap, one task after another (torch's fused BatchNorm kernel)
  one-ops-bn        one task at a time, BatchNorm from var_mean/addcmul ops instead
  one-cl            one task at a time, query images channels-last
  one-workers-2     one task at a time, 2 worker threads with 1 intra-op thread each
  one-cl-workers-2  both
  auto              fmaml.auto_strategy's choice
  auto-checkpoint   auto, with every inner step recomputed in the backward
  learn2learn       the peer, for reference (if installed)
  higher            the peer, for reference (if installed)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "vmap-all": (
        "fmaml",
        {"chunk_size": None, "workers": 1, "channels_last": False, "threads": None},
        None,
    ),
    "vmap-all-1-thread": (
        "fmaml",
        {"chunk_size": None, "workers": 1, "channels_last": False, "threads": 1},
        None,
    ),
    "vmap-chunk-8": (
        "fmaml",
        {"chunk_size": 8, "workers": 1, "channels_last": False, "threads": None},
        None,
    ),
    "vmap-ops-bn": (
        "fmaml",
        {"chunk_size": None, "workers": 1, "channels_last": False, "threads": None},
        "mean-var-bn",
    ),
    "vmap-half-workers-2": (
        "fmaml",
        {"chunk_size": 16, "workers": 2, "channels_last": False, "threads": None},
        None,
    ),
    "one-at-a-time": (
        "fmaml",
        {"chunk_size": 1, "workers": 1, "channels_last": False, "threads": None},
        None,
    ),
    "one-ops-bn": (
        "fmaml",
        {"chunk_size": 1, "workers": 1, "channels_last": False, "threads": None},
        "ops-bn",
    ),
    "one-cl": (
        "fmaml",
        {"chunk_size": 1, "workers": 1, "channels_last": True, "threads": None},
        None,
    ),
    "one-workers-2": (
        "fmaml",
        {"chunk_size": 1, "workers": 2, "channels_last": False, "threads": None},
        None,
    ),
    "one-cl-workers-2": (
        "fmaml",
        {"chunk_size": 1, "workers": 2, "channels_last": True, "threads": None},
        None,
    ),
    "auto": ("fmaml", {}, None),
    "auto-checkpoint": ("fmaml", {"checkpoint": True}, None),
    "learn2learn": ("learn2learn", {}, None),
    "higher": ("higher", {}, None),
}


def _patch(name: str | None) -> None:
    """Swap fmaml's BatchNorm for an older formulation (measurement only)."""
    if name is None:
        return
    import torch

    from fmaml.nn import batchnorm

    if name == "ops-bn":  # var_mean + addcmul everywhere, never the fused kernel
        batchnorm._fused_kernel_is_exact = lambda x: False
    elif name == "mean-var-bn":  # the layer as it was: mean, (x - mean) ** 2, mean, ...

        def forward(self, x):
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dim=dims, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
            out = (x - mean) * torch.rsqrt(var + self.eps)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return out * self.weight.reshape(shape) + self.bias.reshape(shape)

        batchnorm.BatchNorm.forward = forward


def _worker() -> None:
    job = json.loads(sys.stdin.read())
    import torch

    torch.set_num_threads(job.pop("threads"))
    _patch(job.pop("patch"))
    from fmaml.bench import measure

    print(json.dumps(measure(**job)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["sinusoid", "omniglot", "miniimagenet"])
    parser.add_argument("--order", choices=["second", "first"], default="second")
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--json", default=None, help="Write the rows to this file.")
    args = parser.parse_args()

    import torch

    from fmaml.bench import SETTINGS, describe_device, peer_missing

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    names = args.variants or [
        v for v in VARIANTS if not (cuda and (v.startswith("one-") or "workers" in v))
    ]
    rows = []
    print(f"# {describe_device(args.device)}, torch {torch.__version__}", flush=True)
    for setting in args.settings:
        for variant in names:
            impl, strategy, patch = VARIANTS[variant]
            if peer_missing(impl):
                print(f"{setting:<12} {variant:<18} skipped: {peer_missing(impl)}", flush=True)
                continue
            job = {
                "setting": setting,
                "order": args.order,
                "impl": impl,
                "repeats": args.repeats,
                "device": args.device,
                "min_seconds": args.min_seconds,
                "strategy": strategy,
                "threads": torch.get_num_threads(),
                "patch": patch,
            }
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--worker"],
                input=json.dumps(job),
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if done.returncode != 0:
                print(f"{setting:<12} {variant:<18} failed: {done.stderr.strip()[-400:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            meta_batch = SETTINGS[setting].meta_batch
            row = {"setting": setting, "order": args.order, "variant": variant, **result}
            row["meta_steps_per_s"] = 1 / result["seconds_per_step"]
            row["fastest_meta_steps_per_s"] = 1 / result["fastest_step_s"]
            rows.append(row)
            print(
                f"{setting:<12} {variant:<18} {row['meta_steps_per_s']:9.3f} steps/s "
                f"(fastest step {row['fastest_meta_steps_per_s']:9.3f}) "
                f"{meta_batch * row['meta_steps_per_s']:9.1f} tasks/s "
                f"{result['peak_memory_mb']:8.0f} MB",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
    else:
        main()
