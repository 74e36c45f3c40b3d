"""Training curves of a run folder as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from fmaml.errors import InputError


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl``.

    Raises:
        InputError: no metrics file; says what a run folder holds.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(
            f"plot: no metrics.jsonl in {run_dir}. Pass a run folder written by `fmaml train`."
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Plot the training and validation score (and training loss) against iteration.

    Returns:
        The path of the PNG written (default ``run_dir/curves.png``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    if not train:
        raise InputError(
            f"plot: {run_dir}/metrics.jsonl holds no training rows yet. Plot the run once it "
            "has logged its first training row."
        )
    score = "accuracy" if "accuracy" in train[0] else "mse"
    scale = 100.0 if score == "accuracy" else 1.0
    fig, (ax_score, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    ax_score.plot(
        [r["iteration"] for r in train],
        [scale * r[score] for r in train],
        alpha=0.35,
        label=f"train {score} (query, per meta-batch)",
    )
    window = max(1, len(train) // 50)
    smooth = [
        sum(scale * r[score] for r in train[max(0, i - window + 1) : i + 1])
        / len(train[max(0, i - window + 1) : i + 1])
        for i in range(len(train))
    ]
    ax_score.plot([r["iteration"] for r in train], smooth, label="train (moving average)")
    if val:
        its = [r["iteration"] for r in val]
        means = [scale * r["score"] for r in val]
        cis = [scale * r["ci95"] for r in val]
        ax_score.errorbar(its, means, yerr=cis, marker="o", capsize=3, label="validation ± 95% CI")
    ax_score.set_xlabel("iteration")
    ax_score.set_ylabel(f"{score} (%)" if score == "accuracy" else score)
    if score == "mse":
        ax_score.set_yscale("log")
    ax_score.legend()
    ax_score.grid(alpha=0.3)
    ax_loss.plot([r["iteration"] for r in train], [r["loss"] for r in train])
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("meta-loss")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).name))
    fig.tight_layout()
    path = Path(output) if output else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
