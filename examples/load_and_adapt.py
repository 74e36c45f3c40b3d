"""Load a trained run and adapt it to a new task: `fmaml.load_run`, then `fmaml.adapt`.

`fmaml.load_run(path)` gives the model, its meta-learned parameters, the loss, the inner loop
of the run's test setting and the config, in one call. A new task's support set adapts the
parameters; `run.predict(adapted, x)` gives the adapted model's outputs.

    python examples/load_and_adapt.py --run runs/omniglot   # a run of `python cli.py train`:
                                                            # new classes from its test split
    python examples/load_and_adapt.py                       # trains a sinusoid run first
    python examples/load_and_adapt.py --tiny
"""

import argparse
import tempfile
from pathlib import Path

import torch

import fmaml
from fmaml.training.train import build_problem


def train_sinusoid(out: Path, iterations: int) -> Path:
    """A MAML sinusoid run, as `python cli.py train --dataset sinusoid` makes it."""
    config = fmaml.TrainConfig(dataset="sinusoid", iterations=iterations, val_episodes=10)
    fmaml.fit(config, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder or checkpoint [train one]")
    parser.add_argument("--tiny", action="store_true", help="a tiny run to load")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        path = args.run or train_sinusoid(Path(scratch) / "sin", 20 if args.tiny else 2000)
        run = fmaml.load_run(path)  # model, params, loss_fn, inner, config
        print(f"loaded {run.path} (iteration {run.iteration}): {run.inner.num_steps} inner steps")

        # A new task: for a classification run, new classes from its test split, numbered
        # 0..ways-1 (as the run was trained); for the sinusoid, a new sine.
        problem = build_problem(run.config, check_train=False)
        split = "test" if "test" in problem.splits else next(iter(problem.splits))
        batch = next(iter(problem.episodes(split, 1, seed=0, chunk=1)))
        support = tuple(t[0] for t in batch.support)
        x_query, y_query = batch.query[0][0], batch.query[1][0]

        adapted = fmaml.adapt(run.loss_fn, run.params, support, run.inner)
        before = run.predict(run.params, x_query)
        after = run.predict(adapted, x_query)
        if run.config.dataset == "sinusoid":
            name = "mse"
            scores = [torch.mean((out - y_query) ** 2).item() for out in (before, after)]
        else:
            name = "accuracy"
            scores = [(out.argmax(-1) == y_query).float().mean().item() for out in (before, after)]
        print(f"{split} task {name}: {scores[0]:.4f} before adapting")
        print(f"final {name} after {run.inner.num_steps} inner steps: {scores[1]:.6f}")


if __name__ == "__main__":
    main()
