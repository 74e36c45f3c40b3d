"""fmaml: MAML-family meta-learning for PyTorch as pure functions on torch.func.

``import fmaml`` loads the core (trees, inner loop, objectives, models, task samplers) and the
engine (:mod:`fmaml.engine`: strategies); the training shell (:mod:`fmaml.training`:
``TrainConfig``, ``fit``, ``TrainState``, ...) and the image loaders (PIL) load when one of
their names is first used, and the benchmark harness (:mod:`fmaml.bench`) when imported.
"""

import importlib
import importlib.abc
import sys

from fmaml import inner_optim, nn, schedules, tasks
from fmaml.adapt import adapt, init_rates, step_rates, unroll
from fmaml.engine.strategy import MetaGradients, Strategy, auto_strategy, value_and_grad
from fmaml.evaluate import evaluate, mean_ci95
from fmaml.implicit import IMAML, imaml_loss
from fmaml.inner_loop import InnerLoop
from fmaml.inner_optim import InnerOptimizer
from fmaml.module import SupervisedLoss, accuracy, params_of, per_step, supervised_loss
from fmaml.objectives import meta_loss, meta_scores, reptile_loss, task_loss, task_scores
from fmaml.proto import prototype_head, prototypes
from fmaml.tree import combine, partition, tree_map
from fmaml.types import Batch, LossFn, Params, Task

_LAZY = {
    "TrainConfig": ("fmaml.training.config", "TrainConfig"),
    "TrainState": ("fmaml.training.train", "TrainState"),
    "evaluate_state": ("fmaml.training.train", "evaluate_state"),
    "restore_state": ("fmaml.training.train", "restore_state"),
    "fit": ("fmaml.training.train", "train"),
    "load_run": ("fmaml.training.run", "load_run"),
}
"""Public names of the training shell: ``name -> (module, attribute)``, imported on first use."""


_MOVED = {
    "fmaml.strategy": (
        "fmaml.engine.strategy",
        ", or use the top-level names fmaml.Strategy, fmaml.auto_strategy, fmaml.value_and_grad "
        "and fmaml.MetaGradients",
    ),
    "fmaml.config": ("fmaml.training.config", ", or use the top-level name fmaml.TrainConfig"),
    "fmaml.train": (
        "fmaml.training.train",
        ", or use the top-level names fmaml.fit, fmaml.TrainState, fmaml.evaluate_state and "
        "fmaml.restore_state",
    ),
    "fmaml.cli": (
        "fmaml.training.cli",
        " (the `fmaml` command and `python cli.py` are unchanged)",
    ),
    "fmaml.checkpoint": ("fmaml.training.checkpoint", ""),
    "fmaml.distributed": ("fmaml.training.distributed", ""),
    "fmaml.plot": ("fmaml.training.plot", ""),
    "fmaml.presets": ("fmaml.training.presets", ""),
    "fmaml.problems": ("fmaml.training.problems", " (build_problem is in fmaml.training.train)"),
    "fmaml.image_problems": ("fmaml.training.image_problems", ""),
}
"""Modules that moved into the engine and the training shell: ``old -> (new, what else to
say)``. The benchmark harness stayed at ``fmaml.bench``, now a package."""


def _moved_message(old: str) -> str:
    new, more = _MOVED[old]
    return f"{old} moved to {new}: import it from there{more}."


class _MovedModules(importlib.abc.MetaPathFinder):
    """Makes ``import fmaml.strategy`` (and the other paths of :data:`_MOVED`) raise an
    ``ImportError`` that names the new module; every other name is left to the other finders.

    It is asked first: an old path must never load a file of another fmaml on ``sys.path``
    (an older install, or another checkout's editable install) beside this one."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in _MOVED:
            raise ImportError(_moved_message(fullname), name=fullname)
        return None


sys.meta_path[:] = [f for f in sys.meta_path if type(f).__qualname__ != "_MovedModules"]
sys.meta_path.insert(0, _MovedModules())  # one, even if this module is loaded again


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    if f"fmaml.{name}" in _MOVED:
        raise AttributeError(_moved_message(f"fmaml.{name}"))
    raise AttributeError(f"module 'fmaml' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "IMAML",
    "Batch",
    "InnerLoop",
    "InnerOptimizer",
    "LossFn",
    "MetaGradients",
    "Params",
    "Strategy",
    "SupervisedLoss",
    "Task",
    "TrainConfig",
    "TrainState",
    "accuracy",
    "adapt",
    "auto_strategy",
    "combine",
    "evaluate",
    "evaluate_state",
    "fit",
    "imaml_loss",
    "init_rates",
    "inner_optim",
    "load_run",
    "mean_ci95",
    "meta_loss",
    "meta_scores",
    "nn",
    "params_of",
    "partition",
    "per_step",
    "prototype_head",
    "prototypes",
    "reptile_loss",
    "restore_state",
    "schedules",
    "step_rates",
    "supervised_loss",
    "task_loss",
    "task_scores",
    "tasks",
    "tree_map",
    "unroll",
    "value_and_grad",
]
