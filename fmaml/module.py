"""Bridges from ``nn.Module`` to pure functions of a parameter dict."""

from __future__ import annotations

import copy
import dataclasses
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fmaml.nn.batchnorm import BatchNorm, with_batch_statistics, with_stat_mask, with_stat_rows
from fmaml.padding import is_padded, unpack
from fmaml.types import Batch, LossOptions, Params


def params_of(model: nn.Module) -> Params:
    """The model's trainable parameters as a dict of fresh leaves.

    Each tensor is a detached copy that requires grad, so an optimizer stepping on them never
    touches the module, and the module never changes them.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``{name: tensor}`` for every parameter with ``requires_grad``, in module order.

    Example:
        >>> import fmaml
        >>> list(fmaml.params_of(fmaml.nn.mlp()))[:2]
        ['body.0.weight', 'body.0.bias']
    """
    return {
        name: p.detach().clone().requires_grad_(True)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


_THREAD_COPIES = threading.local()
"""Per thread: ``{id(module): (weakref to module, this thread's copy)}`` (SupervisedLoss._here)."""


def private_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure holding the same tensors (parameters, buffers and
    tensor attributes are shared, not copied), for ``functional_call`` in another thread:
    it swaps the tensors of the module it is given while it runs."""
    shared = {
        id(t): t
        for m in module.modules()
        for t in [*vars(m).values(), *m._parameters.values(), *m._buffers.values()]
        if isinstance(t, Tensor)
    }
    return copy.deepcopy(module, shared)


class SupervisedLoss:
    """``loss(params, (x, y)) = criterion(model(x; params), y)``, via ``functional_call``.

    Built by :func:`supervised_loss`. Holds a private copy of the model in which every
    ``nn.BatchNorm*`` is replaced by :class:`fmaml.nn.BatchNorm` (batch statistics, as MAML
    uses them; exact second-order gradients under ``vmap``), and the model's buffers and
    frozen parameters, which it passes alongside ``params`` so that
    ``functional_call(..., strict=True)`` never falls back to a module tensor silently.

    A padded set ``(x, y, mask)`` or ``(x, y, mask, classes)`` (:mod:`fmaml.padding`,
    :func:`fmaml.tasks.pad_tasks`) is scored on its real rows only: their rows of ``x`` go
    through a copy of the model whose BatchNorm statistics count the real rows only (padded
    rows of ``x`` are replaced by zeros first, so even NaN padding changes nothing), the
    logits of classes outside ``classes`` are set to ``-inf``, and the loss is the mean of
    ``criterion`` over the real rows, each row scored alone
    (``criterion(out[i:i+1], y[i:i+1])``). This equals ``criterion`` on the real rows for
    a criterion that is a mean over rows (``F.cross_entropy``, ``F.mse_loss``,
    :func:`fmaml.accuracy`). With :meth:`with_support_statistics`, the query is normalised
    with the statistics of the support set's real rows (``stats_from`` is then the whole
    padded support set, as :func:`fmaml.adapt.at_step` passes it).

    With :meth:`with_autocast` (mixed precision), the model's forward pass runs under
    ``torch.autocast`` in bfloat16, entered inside each call (thread-local and scoped: no
    state is left changed), while ``params``, their gradients and the criterion stay in the
    parameters' dtype (float32).
    """

    options: LossOptions = LossOptions()
    """How the inner loop calls this loss (stepwise, per-step keys, support statistics,
    autocast): declared, and changed only by building a new loss."""

    home_thread: int | None = None
    """The thread that may run the module itself (``None``: any); others use copies."""

    @property
    def stepwise(self) -> bool:
        """Whether the loss takes the inner step (``loss(params, batch, step=s)``): MAML++ BNWB."""
        return self.options.stepwise

    @property
    def per_step_keys(self) -> tuple[str, ...]:
        """The parameters with one slot per inner step (:func:`per_step`)."""
        return self.options.per_step_keys

    @property
    def support_statistics(self) -> bool:
        """BatchNorm statistics of the query come from the support set (MAML++ BNRS,
        fmaml's leak-free form); ``False``: from the batch itself (MAML's transductive
        default)."""
        return self.options.support_statistics

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype the model's forward pass runs in under ``torch.autocast`` (mixed
        precision, :meth:`with_autocast`); ``None``: the parameters' dtype throughout."""
        return self.options.autocast

    def __init__(self, model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor]):
        self.module = with_batch_statistics(model)
        # functional_call swaps a module's tensors while it runs, so a thread other than
        # this one calls the loss on its own copy of the module (see _here)
        self.home_thread: int | None = threading.get_ident()
        self.criterion = criterion
        self.fixed = {
            **{k: b.detach() for k, b in self.module.named_buffers()},
            **{k: p.detach() for k, p in self.module.named_parameters() if not p.requires_grad},
        }
        self.param_names = [k for k, p in self.module.named_parameters() if p.requires_grad]

    def predict(
        self,
        params: Mapping[str, Tensor],
        x: Tensor,
        step: int = 0,
        stats_from: Tensor | None = None,
    ) -> Tensor:
        """The model's output for ``x: [n, *feature]`` under ``params`` (at inner ``step``).

        Per-step parameters (see :func:`per_step`) are ``[slots, *shape]``; ``step`` picks a
        slot, the last one for any later step. With ``stats_from: [m, *feature]`` (a support
        set), BatchNorm normalises ``x`` with the statistics of ``stats_from`` alone: the rows
        of ``x`` do not influence each other.
        """
        return self._call(self._here(), self._values(params, step), x, stats_from, self.autocast)

    def embed(
        self,
        params: Mapping[str, Tensor],
        x: Tensor,
        step: int = 0,
        stats_from: Tensor | None = None,
    ) -> Tensor:
        """The output of the model's ``body`` for ``x: [n, *feature]``: ``[n, features]``.

        The features the ``head`` sees (ProtoNet's embeddings; see
        :func:`fmaml.prototype_head`). ``step`` and ``stats_from`` as in :meth:`predict`.

        Raises:
            ValueError: the model has no ``body`` and ``head`` submodules.
        """
        self.linear_head()  # checks that there are a body and a linear head
        body = self._here().body
        values = {
            k.removeprefix("body."): v
            for k, v in self._values(params, step).items()
            if k.startswith("body.")
        }
        return self._call(body, values, x, stats_from, self.autocast)

    def linear_head(self) -> nn.Linear:
        """The model's ``head``, checked to be an ``nn.Linear`` with a bias.

        Raises:
            ValueError: the model has no ``body`` and ``head`` submodules, or its head is not
                linear with a bias.
        """
        body, head = getattr(self.module, "body", None), getattr(self.module, "head", None)
        if not isinstance(body, nn.Module) or not isinstance(head, nn.Module):
            raise ValueError(
                "supervised_loss(): prototype heads need a model with `body` and `head` "
                f"submodules (head(body(x))), got {type(self.module).__name__} without them. "
                "Build it as fmaml.nn.models.Classifier(body, nn.Linear(features, num_ways)) "
                "(fmaml.nn.conv4 and fmaml.nn.mlp are)."
            )
        if not isinstance(head, nn.Linear) or head.bias is None:
            bias = "" if not isinstance(head, nn.Linear) else " without a bias"
            raise ValueError(
                "supervised_loss(): prototype heads replace a linear head, W = 2 c_k and "
                f"b = -|c_k|^2, but the model's `head` is {type(head).__name__}{bias}. Use "
                "head=nn.Linear(features, num_ways) (with its bias)."
            )
        return head

    def _here(self) -> nn.Module:
        """The module this thread may run ``functional_call`` on: :attr:`module` in the
        thread that made the loss (or in any, once a strategy gave the loss a private module,
        ``home_thread = None``), else this thread's own copy of it (same tensors), made once.
        Under ``torch.compile`` the module itself (compiled meta-steps take turns)."""
        module = self.module
        if torch.compiler.is_compiling() or self.home_thread in (None, threading.get_ident()):
            return module
        copies = _THREAD_COPIES.__dict__.setdefault("copies", {})
        entry = copies.get(id(module))
        if entry is None or entry[0]() is not module:
            entry = copies[id(module)] = (weakref.ref(module), private_copy(module))
        return entry[1]

    def _values(self, params: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        """The tensors ``functional_call`` gets: ``params`` (per-step ones at ``step``) and
        the fixed buffers and frozen parameters."""
        self._check_keys(params)
        if self.autocast is not None:
            _check_autocast_params(params)
        if self.per_step_keys:
            params = {
                k: v[min(step, v.shape[0] - 1)] if k in self.per_step_keys else v
                for k, v in params.items()
            }
        return {**self.fixed, **params}

    @staticmethod
    def _call(
        module: nn.Module,
        values: dict,
        x: Tensor,
        stats_from: Tensor | None,
        autocast: torch.dtype | None = None,
    ) -> Tensor:
        if stats_from is None:
            return _forward(module, values, x, autocast)
        rows = stats_from.shape[0]
        module = with_stat_rows(module, rows)
        both = torch.cat([stats_from, x])
        return _forward(module, values, both, autocast)[rows:]

    def __call__(
        self,
        params: Mapping[str, Tensor],
        batch: Batch,
        step: int = 0,
        stats_from: Tensor | Batch | None = None,
    ) -> Tensor:
        if is_padded(batch) or is_padded(stats_from):
            return self._masked(params, batch, step, stats_from)
        x, y = batch
        return self.criterion(self.predict(params, x, step, stats_from), y)

    def _masked(self, params, batch, step: int, stats_from) -> Tensor:
        """The loss of a padded set (or of a set normalised with a padded support set's
        statistics): the mean of ``criterion`` over its real rows, with BatchNorm statistics
        of the real rows (of the support's with ``stats_from``) and absent classes' logits
        at ``-inf``."""
        padded = is_padded(batch)
        if padded:
            x, y, mask, classes = unpack(batch, "supervised_loss")
        else:
            (x, y), classes = batch, None
            mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        x = _zero_padding(x, mask)
        if stats_from is None:
            rows, stat_mask = 0, mask
        elif is_padded(stats_from):
            support_x, _, support_mask, _ = unpack(stats_from, "supervised_loss")
            rows = support_x.shape[0]
            x = torch.cat([_zero_padding(support_x, support_mask), x])
            stat_mask = torch.cat([support_mask, torch.zeros_like(mask)])
        else:
            raise ValueError(
                "supervised_loss(): the query set is padded but its BatchNorm statistics come "
                "from the support set's x alone, without its mask, so padded support rows "
                "would enter them. Pass the whole support set (x, y, mask): "
                "fmaml.adapt.at_step(loss_fn, step, task.support)."
            )
        module = with_stat_mask(self._here(), stat_mask)
        out = _forward(module, self._values(params, step), x, self.autocast)[rows:]
        if not padded:
            return self.criterion(out, y)
        if classes is not None:
            if out.dim() != 2 or out.shape[-1] != classes.shape[0]:
                raise ValueError(
                    f"supervised_loss(): a padded set's `classes` marks {classes.shape[0]} "
                    f"classes but the model's output is {list(out.shape)}; expected "
                    f"[n, {classes.shape[0]}]. Pad the tasks to the head's outputs "
                    "(fmaml.tasks.pad_tasks(tasks, num_ways=...))."
                )
            out = out.masked_fill(~classes, float("-inf"))
        criterion = self.criterion
        per_row = torch.func.vmap(lambda o, t: criterion(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
        zero = torch.zeros((), dtype=per_row.dtype, device=per_row.device)
        return torch.where(mask, per_row, zero).sum() / mask.sum().to(per_row.dtype)

    def with_support_statistics(self, enabled: bool = True) -> SupervisedLoss:
        """This loss with the query's BatchNorm statistics taken from the support set."""
        return self._with(dataclasses.replace(self.options, support_statistics=enabled))

    def with_autocast(self, dtype: torch.dtype | None = torch.bfloat16) -> SupervisedLoss:
        """This loss with the model's forward pass in mixed precision (``None``: off).

        Each call enters ``torch.autocast(device_type=x.device.type, dtype=dtype)`` around
        the model's forward pass only, so it is thread-local and scoped (strategies with
        worker threads get it in every thread; nothing is left changed). The parameters,
        every gradient (first and second order: MAML's meta-gradient flows through it),
        the optimiser's state and the criterion stay in the parameters' dtype (float32):
        the model's output is cast back to the input's dtype before the criterion, and
        :class:`fmaml.nn.BatchNorm` computes its statistics and normalises in float32, as
        autocast runs normalisation layers.

        The meta-gradient is then as close to the float32 one as bfloat16's 8-bit mantissa
        allows: on a small conv4 with BatchNorm it differs from it by about as much as the
        float32 meta-gradient at parameters rounded to bfloat16 does (README, Mixed
        precision, gives the measured tolerance).

        Args:
            dtype: ``torch.bfloat16``, or ``None`` to turn autocast off.

        Raises:
            ValueError: another dtype (float16 would need loss scaling, which fmaml does not
                do).

        Example:
            >>> import torch, torch.nn.functional as F, fmaml
            >>> model = fmaml.nn.mlp()
            >>> loss = fmaml.supervised_loss(model, F.mse_loss).with_autocast(torch.bfloat16)
            >>> loss(fmaml.params_of(model), (torch.zeros(3, 1), torch.zeros(3, 1))).dtype
            torch.float32
        """
        if dtype is not None and dtype != torch.bfloat16:
            raise ValueError(
                f"SupervisedLoss.with_autocast(): mixed precision runs the forward pass in "
                f"torch.bfloat16, got {dtype!r}. float16 would need loss scaling (its range "
                "underflows small gradients), which fmaml does not do. Use torch.bfloat16, "
                "or None for full precision."
            )
        return self._with(dataclasses.replace(self.options, autocast=dtype))

    def with_criterion(self, criterion: Callable[[Tensor, Tensor], Tensor]) -> SupervisedLoss:
        """The same model with another criterion (e.g. a metric for evaluation)."""
        other = copy.copy(self)
        other.criterion = criterion
        return other

    def with_options(self, options: LossOptions) -> SupervisedLoss:
        """The same model and criterion with ``options`` (e.g. another loss's, for a loss
        built for other shots that must be called the same way)."""
        if not isinstance(options, LossOptions):
            raise TypeError(
                f"SupervisedLoss.with_options(): expected an fmaml.types.LossOptions, got "
                f"{type(options).__name__}. Build one with dataclasses.replace(loss.options, ...)."
            )
        return self._with(options)

    def on_private_module(self) -> SupervisedLoss:
        """This loss on a private copy of its module (the same tensors), callable from any
        thread: what a strategy's worker thread runs (:mod:`fmaml.engine.strategy`)."""
        other = copy.copy(self)
        other.module, other.home_thread = private_copy(self.module), None
        return other

    def _with(self, options: LossOptions) -> SupervisedLoss:
        other = copy.copy(self)
        other.options = options
        return other

    def batchnorm_keys(self) -> list[str]:
        """Names of the BatchNorm weights and biases among the trainable parameters."""
        keys = [
            f"{name}.{leaf}"
            for name, module in self.module.named_modules()
            if isinstance(module, BatchNorm)
            for leaf in ("weight", "bias")
            if getattr(module, leaf) is not None
        ]
        return [k for k in keys if k in self.param_names]

    def _check_keys(self, params: Mapping[str, Tensor]) -> None:
        missing = [k for k in self.param_names if k not in params]
        unexpected = [k for k in params if k not in set(self.param_names)]
        if missing or unexpected:
            raise ValueError(
                "supervised_loss(): `params` does not match the model's trainable parameters.\n"
                f"  missing:    {missing}\n"
                f"  unexpected: {unexpected}\n"
                "Build params with fmaml.params_of(model) from the same model."
            )


def _forward(module: nn.Module, values: dict, x: Tensor, autocast: torch.dtype | None) -> Tensor:
    """``module(x)`` under ``values``; with ``autocast``, inside ``torch.autocast`` on ``x``'s
    device, and the output cast back to ``x``'s dtype (the criterion runs in full precision)."""
    if autocast is None:
        return torch.func.functional_call(module, values, (x,), strict=True)
    with torch.autocast(device_type=x.device.type, dtype=autocast):
        out = torch.func.functional_call(module, values, (x,), strict=True)
    return out.to(x.dtype) if out.is_floating_point() and x.is_floating_point() else out


def _check_autocast_params(params: Mapping[str, Tensor]) -> None:
    """Mixed precision needs float32 parameters: autocast leaves float64 tensors alone."""
    other = sorted({str(v.dtype) for v in params.values() if v.dtype != torch.float32})
    if other:
        raise ValueError(
            f"supervised_loss(): mixed precision (with_autocast) keeps float32 parameters and "
            f"runs the forward pass in bfloat16, but `params` hold {', '.join(other)}. Build "
            "the model in float32 (--dtype float32), or turn mixed precision off "
            "(with_autocast(None), --precision float32)."
        )


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with the rows ``mask`` leaves out set to 0 (padding of any value, NaN too, then
    changes nothing, not even a gradient)."""
    keep = mask.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def per_step(
    loss_fn: SupervisedLoss, params: Mapping[str, Tensor], keys: Sequence[str], num_steps: int
) -> tuple[SupervisedLoss, Params]:
    """One copy of the ``keys`` parameters per inner step (MAML++ BNWB).

    The returned parameters hold each selected tensor stacked ``num_steps + 1`` times,
    ``[num_steps + 1, *shape]``: slot ``s`` is used for the forward pass after ``s`` inner
    steps. The returned loss is *stepwise*: :func:`fmaml.unroll` and :func:`fmaml.task_loss`
    pass it the step. With every slot equal, the loss and meta-gradient (summed over the
    slots) are MAML's.

    Args:
        loss_fn: from :func:`supervised_loss`.
        params: ``{name: tensor}``.
        keys: the names to give per-step copies, e.g. ``loss_fn.batchnorm_keys()``.
        num_steps: inner steps.

    Returns:
        ``(stepwise_loss_fn, params)`` with new leaves that require grad.

    Raises:
        ValueError: a key that is not a parameter.

    Example:
        >>> import torch.nn.functional as F, fmaml
        >>> model = fmaml.nn.conv4(5)
        >>> loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
        >>> stepwise, params = per_step(loss_fn, fmaml.params_of(model),
        ...                             loss_fn.batchnorm_keys(), num_steps=5)
        >>> params["body.block0.norm.weight"].shape
        torch.Size([6, 64])
    """
    unknown = [k for k in keys if k not in params]
    if unknown:
        raise ValueError(
            f"per_step(): {unknown} are not parameters; expected names from "
            "fmaml.params_of(model), e.g. loss_fn.batchnorm_keys()."
        )
    stacked = {
        k: v.detach().unsqueeze(0).repeat(num_steps + 1, *([1] * v.dim())).requires_grad_(True)
        if k in keys
        else v
        for k, v in params.items()
    }
    options = dataclasses.replace(loss_fn.options, per_step_keys=tuple(keys), stepwise=bool(keys))
    return loss_fn.with_options(options), stacked


def supervised_loss(
    model: nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    *,
    autocast: torch.dtype | None = None,
) -> SupervisedLoss:
    """A pure loss function ``(params, (x, y)) -> scalar`` for any ``nn.Module``.

    Args:
        model: the network; its parameter names are the keys of ``params``.
        criterion: ``criterion(output, y) -> scalar``, e.g. ``F.cross_entropy``,
            ``F.mse_loss`` or :func:`fmaml.accuracy`.
        autocast: ``torch.bfloat16``: mixed precision, the model's forward pass under
            ``torch.autocast`` with float32 parameters and gradients (see
            :meth:`SupervisedLoss.with_autocast`); ``None``: off.

    Returns:
        A :class:`SupervisedLoss`; call it as ``loss(params, (x, y))``.

    Example:
        >>> import torch, torch.nn.functional as F, fmaml
        >>> model = fmaml.nn.mlp()
        >>> loss = fmaml.supervised_loss(model, F.mse_loss)
        >>> loss(fmaml.params_of(model), (torch.zeros(3, 1), torch.zeros(3, 1))).shape
        torch.Size([])
    """
    loss = SupervisedLoss(model, criterion)
    return loss if autocast is None else loss.with_autocast(autocast)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of rows whose arg-max equals the label; ``logits: [n, classes]``, ``y: [n]``."""
    return (logits.argmax(dim=-1) == y).to(logits.dtype).mean()
