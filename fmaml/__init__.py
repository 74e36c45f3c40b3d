"""fmaml: MAML-family meta-learning for PyTorch as pure functions on torch.func."""

from fmaml import nn, tasks
from fmaml.adapt import adapt, init_rates, step_rates, unroll
from fmaml.module import SupervisedLoss, accuracy, params_of, supervised_loss
from fmaml.objectives import meta_loss, meta_scores, task_loss, task_scores
from fmaml.tree import combine, partition, tree_map
from fmaml.types import Batch, LossFn, Params, Task

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "LossFn",
    "Params",
    "SupervisedLoss",
    "Task",
    "accuracy",
    "adapt",
    "combine",
    "init_rates",
    "meta_loss",
    "meta_scores",
    "nn",
    "params_of",
    "partition",
    "step_rates",
    "supervised_loss",
    "task_loss",
    "task_scores",
    "tasks",
    "tree_map",
    "unroll",
]
