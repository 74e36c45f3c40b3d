"""A trained run, ready to use: :func:`load_run` gives the model, its meta-learned parameters,
the loss and the inner loop of evaluation, to adapt to a new task and predict.

    run = fmaml.load_run("runs/my-run")             # best.pt, else latest.pt
    adapted = fmaml.adapt(run.loss_fn, run.params, support, run.inner)
    outputs = run.predict(adapted, x)               # logits (classification) or values
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fmaml.adapt import adapt
from fmaml.inner_loop import InnerLoop
from fmaml.module import SupervisedLoss
from fmaml.proto import prototype_head
from fmaml.training.checkpoint import find_checkpoint
from fmaml.training.config import TrainConfig
from fmaml.types import Batch, Params

__all__ = ["Run", "load_run"]


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A trained model and what it takes to adapt it to a new task; built by :func:`load_run`.

    Attributes:
        model: the network (its parameter names key ``params``); its own tensors are not the
            trained ones: use ``params`` (through :meth:`predict` or ``loss_fn``).
        params: the meta-learned parameters ``{name: tensor}``, detached.
        loss_fn: the loss the run adapts with, ``loss_fn(params, (x, y)) -> scalar``
            (cross-entropy or MSE; its :meth:`~fmaml.SupervisedLoss.predict` gives outputs).
        inner: the inner loop of evaluation: the trained (or learned) rates, the run's test
            step count (``config.eval_inner_steps``), the adapted keys and inner optimiser.
        config: the run's settings.
        iteration: the iteration the checkpoint was written at.
        path: the checkpoint file read.
    """

    model: nn.Module
    params: Params
    loss_fn: SupervisedLoss
    inner: InnerLoop
    config: TrainConfig
    iteration: int
    path: Path

    def adapt(self, support: Batch) -> Params:
        """``adapted`` parameters for one task's ``support = (x [n, *feature], y [n])``.

        ``fmaml.adapt(run.loss_fn, run.params, support, run.inner)``, and for a run whose
        head starts from the support set's class prototypes (``protomaml``, ``protonet``),
        that head set first (:func:`fmaml.prototype_head`), as in training and test.
        """
        params = self.params
        if self.inner.head_init == "prototypes":
            params = prototype_head(self.loss_fn, params, support)
        return adapt(self.loss_fn, params, support, self.inner.replace(head_init=None))

    def predict(self, adapted: Params, x: Tensor, *, stats_from: Tensor | None = None) -> Tensor:
        """The model's outputs for ``x: [n, *feature]`` under ``adapted`` (or ``params``):
        logits ``[n, ways]`` for classification, values ``[n, 1]`` for the sinusoid.

        The forward pass is ``torch.func.functional_call`` of the model on ``adapted`` and its
        buffers (:meth:`fmaml.SupervisedLoss.predict`), after the inner loop's last step.
        BatchNorm uses the statistics of ``x`` itself (MAML's transductive setting), or those
        of ``stats_from: [m, *feature]`` (a support set) alone.
        """
        return self.loss_fn.predict(adapted, x, step=self.inner.num_steps, stats_from=stats_from)


def load_run(path: str | Path, *, device: str | None = None) -> Run:
    """Load a trained run to adapt and predict with: one call.

    Args:
        path: a run folder (its ``best.pt``, else ``latest.pt``) or a checkpoint file.
        device: where to put the model (default: the run's device).

    Returns:
        A frozen :class:`Run`.

    Raises:
        CheckpointError: no checkpoint at ``path``, or a damaged one.
        DataError: an image run whose data folder is not there (the loss and model are
            built from the run's config, as :func:`fmaml.restore_state` does).

    Example:
        >>> import fmaml, torch
        >>> run = fmaml.load_run("runs/sinusoid-maml")  # doctest: +SKIP
        >>> x = torch.linspace(-5, 5, 10).unsqueeze(1)
        >>> support = (x, 2 * torch.sin(x + 1))  # a new task: 10 points of a sine
        >>> adapted = fmaml.adapt(run.loss_fn, run.params, support, run.inner)  # doctest: +SKIP
        >>> run.predict(adapted, torch.zeros(1, 1))  # doctest: +SKIP
        tensor([[1.63...]])
    """
    from fmaml.training.train import restore_state

    checkpoint = find_checkpoint(path)
    state = restore_state(checkpoint, device=device)
    inner = state.eval_inner_loop(state.config.eval_inner_steps)
    return Run(
        model=state.problem.model,
        params=_detached(state.params),
        loss_fn=state.problem.loss_fn,
        inner=inner.replace(inner_lr=_detached(inner.inner_lr)),
        config=state.config,
        iteration=state.iteration,
        path=checkpoint,
    )


def _detached(tree: Any) -> Any:
    """``tree`` (a tensor, dict, list of these, or a number) with every tensor detached."""
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {name: _detached(value) for name, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_detached(value) for value in tree)
    return tree
