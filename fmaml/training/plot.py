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


def run_settings(run_dir: str | Path) -> dict | None:
    """The config of the run in ``run_dir`` (from ``latest.pt``, else ``best.pt``), or None."""
    from fmaml.training.checkpoint import BEST, LATEST, CheckpointError, load_checkpoint

    for name in (LATEST, BEST):
        path = Path(run_dir) / name
        if path.is_file():
            try:
                return load_checkpoint(path)["config"]
            except CheckpointError:
                continue
    return None


def curve_labels(config: dict | None, score: str) -> dict[str, str]:
    """What each curve of :func:`plot_run` is, in words: title and legend entries.

    Validation usually runs more inner steps than training (sinusoid: 1 and 10), so the step
    counts are part of the labels.

    Example:
        >>> labels = curve_labels({"dataset": "sinusoid", "algorithm": "maml", "shots": 10,
        ...     "inner_steps": 1, "eval_inner_steps": 10, "meta_batch": 25,
        ...     "val_episodes": 100}, "mse")
        >>> labels["train"]
        'training: query mse after 1 inner step (each meta-batch of 25 tasks)'
        >>> labels["val"]
        'validation: mse after 10 inner steps, 100 fixed tasks, ± 95% CI'
    """
    if config is None:
        return {
            "title": "",
            "train": f"training: query {score} (each meta-batch)",
            "smooth": "training, moving average",
            "val": "validation ± 95% CI",
            "loss": "training meta-loss",
        }

    def steps(n: int) -> str:
        return f"{n} inner step{'s' if n != 1 else ''}"

    if config["dataset"] == "sinusoid":
        what, tasks = f"sinusoid K={config['shots']}", "tasks"
    else:
        within = ", within-alphabet" if config.get("within_alphabet") else ""
        what = f"{config['dataset']} {config['ways']}-way {config['shots']}-shot{within}"
        tasks = "episodes"
    train_steps = steps(config["inner_steps"])
    return {
        "title": f"{config['algorithm']}, {what}",
        "train": f"training: query {score} after {train_steps} "
        f"(each meta-batch of {config['meta_batch']} tasks)",
        "smooth": "training, moving average",
        "val": f"validation: {score} after {steps(config['eval_inner_steps'])}, "
        f"{config['val_episodes']} fixed {tasks}, ± 95% CI",
        "loss": f"training meta-loss: query loss after {train_steps}",
    }


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Plot the training and validation score (and training loss) against iteration.

    The title names the algorithm and task; the legend, below the plot so that it covers no
    point, says what each curve is, with the inner steps behind it (validation usually runs
    more than training), read from the run's checkpoint (:func:`curve_labels`). The training
    meta-loss gets a panel of its own unless it is the score itself (sinusoid: the query MSE).

    Returns:
        The path of the PNG written (default ``run_dir/curves.png``).
    """
    import matplotlib.pyplot as plt

    fig = run_figure(run_dir)
    path = Path(output) if output else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")  # "tight": the legends below the axes too
    plt.close(fig)
    return path


def run_figure(run_dir: str | Path):
    """The matplotlib figure of :func:`plot_run` (Agg backend): the score panel first, then
    the meta-loss panel when the loss is not the score; each legend is below its panel."""
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
    labels = curve_labels(run_settings(run_dir), score)
    scale = 100.0 if score == "accuracy" else 1.0
    # sinusoid: the meta-loss is the query MSE, the score: a second panel would repeat the first
    loss_is_score = all(abs(r["loss"] - r[score]) <= 1e-6 * max(1.0, abs(r[score])) for r in train)
    if loss_is_score:
        fig, ax_score = plt.subplots(1, 1, figsize=(6.5, 4.5))
        ax_loss = None
        labels["train"] += " = the meta-loss"
    else:
        fig, (ax_score, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.5))
    its = [r["iteration"] for r in train]
    ax_score.plot(its, [scale * r[score] for r in train], alpha=0.35, label=labels["train"])
    window = max(1, len(train) // 50)
    smooth = [
        sum(scale * r[score] for r in train[max(0, i - window + 1) : i + 1])
        / len(train[max(0, i - window + 1) : i + 1])
        for i in range(len(train))
    ]
    ax_score.plot(its, smooth, label=labels["smooth"])
    if val:
        ax_score.errorbar(
            [r["iteration"] for r in val],
            [scale * r["score"] for r in val],
            yerr=[scale * r["ci95"] for r in val],
            marker="o",
            capsize=3,
            label=labels["val"],
        )
    ax_score.set_xlabel("iteration")
    ax_score.set_ylabel(f"{score} (%)" if score == "accuracy" else score)
    if score == "mse":
        ax_score.set_yscale("log")
    ax_score.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0.0, -0.15))
    ax_score.grid(alpha=0.3)
    if ax_loss is not None:
        ax_loss.plot(its, [r["loss"] for r in train])
        ax_loss.set_xlabel("iteration")
        ax_loss.set_ylabel("meta-loss")
        ax_loss.set_title(labels["loss"], fontsize="medium")
        ax_loss.set_yscale("log")
        ax_loss.grid(alpha=0.3)
    title = str(Path(run_dir).name)
    fig.suptitle(f"{title}: {labels['title']}" if labels["title"] else title)
    fig.tight_layout()
    return fig
