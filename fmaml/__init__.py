"""fmaml: MAML-family meta-learning for PyTorch as pure functions on torch.func."""

from fmaml import nn, schedules, tasks
from fmaml.adapt import adapt, init_rates, step_rates, unroll
from fmaml.config import TrainConfig
from fmaml.evaluate import evaluate, mean_ci95
from fmaml.module import SupervisedLoss, accuracy, params_of, per_step, supervised_loss
from fmaml.objectives import meta_loss, meta_scores, task_loss, task_scores
from fmaml.strategy import Strategy, auto_strategy
from fmaml.train import TrainState, evaluate_state, restore_state
from fmaml.train import train as fit
from fmaml.tree import combine, partition, tree_map
from fmaml.types import Batch, LossFn, Params, Task

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "LossFn",
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
    "init_rates",
    "mean_ci95",
    "meta_loss",
    "meta_scores",
    "nn",
    "params_of",
    "partition",
    "per_step",
    "restore_state",
    "schedules",
    "step_rates",
    "supervised_loss",
    "task_loss",
    "task_scores",
    "tasks",
    "tree_map",
    "unroll",
]
