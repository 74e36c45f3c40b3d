"""fmaml: MAML-family meta-learning for PyTorch as pure functions on torch.func.

``import fmaml`` loads the core (trees, inner loop, objectives, models, task samplers) and the
engine (:mod:`fmaml.engine`: strategies); the training shell (:mod:`fmaml.training`:
``TrainConfig``, ``fit``, ``TrainState``, ...) and the image loaders (PIL) load when one of
their names is first used, and the benchmark harness (:mod:`fmaml.bench`) when imported.
"""

import importlib

from fmaml import inner_optim, nn, schedules, tasks
from fmaml.adapt import adapt, init_rates, unroll
from fmaml.engine.run import MetaGradients, value_and_grad
from fmaml.engine.strategy import MemoryPlan, Strategy, auto_strategy, plan_memory
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


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
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
    "MemoryPlan",
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
    "plan_memory",
    "prototype_head",
    "prototypes",
    "reptile_loss",
    "restore_state",
    "schedules",
    "supervised_loss",
    "task_loss",
    "task_scores",
    "tasks",
    "tree_map",
    "unroll",
    "value_and_grad",
]
