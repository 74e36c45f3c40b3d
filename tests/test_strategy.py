"""Execution strategies change how meta_loss runs, never what it computes (float64, 1e-9)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fmaml
from fmaml.algorithms import body_keys, head_keys
from fmaml.engine.strategy import Strategy, auto_strategy
from fmaml.nn.batchnorm import _fused_kernel_is_exact

DTYPE = torch.float64

STRATEGIES = {
    "one-at-a-time": Strategy(chunk_size=1),
    "one-at-a-time-workers": Strategy(chunk_size=1, workers=2),
    "chunks-of-2": Strategy(chunk_size=2),
    "checkpoint": Strategy(checkpoint=True),
    "one-at-a-time-checkpoint": Strategy(chunk_size=1, checkpoint=True),
    "chunks-of-2-workers": Strategy(chunk_size=2, workers=2),
    "one-at-a-time-checkpoint-workers": Strategy(chunk_size=1, checkpoint=True, workers=2),
    "one-at-a-time-channels-last": Strategy(chunk_size=1, channels_last=True),
    "vmap-one-thread": Strategy(threads=1),
}

VARIANTS = {
    "maml": {},
    "fomaml": {"first_order": True},
    "anil": {"adapt_keys": head_keys},
    "boil": {"adapt_keys": body_keys},
    "metasgd": {"learned_rates": True},
    "lslr-3-steps-msl": {"num_steps": 3, "per_step_rates": True, "step_weights": [0.2, 0.3, 0.5]},
    "protonet": {"head_init": "prototypes", "num_steps": 0},
    "protomaml-2-steps": {"head_init": "prototypes", "num_steps": 2},
    "protomaml-metasgd": {"head_init": "prototypes", "learned_rates": True},
    "protomaml-adam": {
        "head_init": "prototypes",
        "num_steps": 2,
        "inner_optimizer": fmaml.inner_optim.adam(),
    },
}


def image_tasks(num_tasks=3, num_ways=3, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num_tasks, num_ways * 2, 1, size, size, generator=g, dtype=DTYPE)
    xq = torch.randn(num_tasks, num_ways * 3, 1, size, size, generator=g, dtype=DTYPE)
    ys = torch.arange(num_ways).repeat(2).expand(num_tasks, -1)
    yq = torch.arange(num_ways).repeat(3).expand(num_tasks, -1)
    return fmaml.Task(support=(xs, ys), query=(xq, yq))


def build(variant_name="maml", model_name="conv4"):
    torch.manual_seed(0)
    if model_name == "conv4":
        model = fmaml.nn.conv4(3, hidden=4, image_size=12).to(DTYPE)
        tasks, criterion = image_tasks(), F.cross_entropy
    else:
        model = fmaml.nn.mlp(hidden=(8, 8)).to(DTYPE)
        g = torch.Generator().manual_seed(0)
        tasks = fmaml.tasks.SinusoidTasks(num_shots=5).sample(3, g, dtype=DTYPE)
        criterion = F.mse_loss
    params = fmaml.params_of(model)
    variant = dict(VARIANTS[variant_name])
    settings = {"inner_lr": 0.1, "num_steps": 1}
    if variant.pop("learned_rates", False):
        g = torch.Generator().manual_seed(3)
        settings["inner_lr"] = {
            k: (0.05 + 0.1 * torch.rand(v.shape, generator=g, dtype=DTYPE)).requires_grad_()
            for k, v in params.items()
        }
    if variant.pop("per_step_rates", False):
        settings["inner_lr"] = fmaml.init_rates(
            params, 0.1, per_element=False, num_steps=variant["num_steps"]
        )
    settings.update(variant)
    return fmaml.supervised_loss(model, criterion), params, tasks, fmaml.InnerLoop(**settings)


def leaves_of(params, inner):
    rates = inner.inner_lr
    rates = rates if isinstance(rates, list) else [rates]
    extra = [v for r in rates if isinstance(r, dict) for v in r.values()]
    return list(params.values()) + extra


def assert_same_meta_gradient(loss_fn, params, tasks, inner, strategy):
    leaves = leaves_of(params, inner)
    reference = fmaml.meta_loss(loss_fn, params, tasks, inner)
    expected = torch.autograd.grad(reference, leaves, allow_unused=True)
    loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner, wrt=leaves, strategy=strategy)
    got = grads.wrt
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        a = torch.zeros_like(leaves[i]) if a is None else a
        b = torch.zeros_like(leaves[i]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"leaf {i}")
    for k, b in zip(params, expected, strict=False):  # the same gradients in params' places
        a = grads.params[k]
        a = torch.zeros_like(params[k]) if a is None else a
        b = torch.zeros_like(params[k]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"params[{k!r}]")
    assert any(g is not None and g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize("variant_name", list(VARIANTS))
@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
def test_every_strategy_gives_the_same_meta_gradient_on_conv4(strategy_name, variant_name):
    loss_fn, params, tasks, inner = build(variant_name)
    assert_same_meta_gradient(loss_fn, params, tasks, inner, STRATEGIES[strategy_name])


@pytest.mark.parametrize("strategy_name", ["one-at-a-time", "one-at-a-time-checkpoint"])
@pytest.mark.parametrize("variant_name", ["maml", "metasgd", "lslr-3-steps-msl"])
def test_strategies_on_the_sinusoid_mlp(strategy_name, variant_name):
    loss_fn, params, tasks, inner = build(variant_name, model_name="mlp")
    assert_same_meta_gradient(loss_fn, params, tasks, inner, STRATEGIES[strategy_name])


@pytest.mark.parametrize("strategy", [Strategy(chunk_size=1), Strategy(checkpoint=True)])
def test_strategies_with_per_step_batchnorm_and_support_statistics(strategy):
    loss_fn, params, tasks, inner = build("maml")
    inner = inner.replace(num_steps=2)
    stepwise, stacked = fmaml.per_step(loss_fn, params, loss_fn.batchnorm_keys(), num_steps=2)
    stepwise = stepwise.with_support_statistics()
    assert_same_meta_gradient(stepwise, stacked, tasks, inner, strategy)


def test_one_task_at_a_time_matches_an_autograd_oracle_with_torch_batchnorm():
    """Without vmap, BatchNorm runs torch's fused kernel: its second order is exact there."""
    loss_fn, params, tasks, inner = build("maml")
    inner = inner.replace(num_steps=2)
    oracle_model = fmaml.nn.conv4(3, hidden=4, image_size=12).to(DTYPE)
    for module in oracle_model.modules():
        for name, child in module.named_children():
            if isinstance(child, fmaml.nn.BatchNorm):
                setattr(module, name, torch.nn.BatchNorm2d(4, track_running_stats=False))
    total = 0.0
    for t in range(3):
        fast = dict(params)
        for _ in range(2):
            x, y = tasks.support[0][t], tasks.support[1][t]
            out = torch.func.functional_call(oracle_model, fast, (x,))
            grads = torch.autograd.grad(
                F.cross_entropy(out, y), list(fast.values()), create_graph=True
            )
            fast = {k: v - 0.1 * g for (k, v), g in zip(fast.items(), grads)}
        out = torch.func.functional_call(oracle_model, fast, (tasks.query[0][t],))
        total = total + F.cross_entropy(out, tasks.query[1][t]) / 3
    expected = torch.autograd.grad(total, list(params.values()))
    _, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=Strategy(chunk_size=1))
    got = [grads.params[k] for k in params]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_fused_batchnorm_kernel_only_outside_vmap():
    x = torch.randn(4, 3, 2, 2)
    seen = []

    def probe(v):
        seen.append(_fused_kernel_is_exact(v))
        return v.sum()

    probe(x)
    torch.func.grad(probe)(x)
    torch.func.vmap(probe)(x[None])
    assert seen == [True, True, False]
    assert not _fused_kernel_is_exact(torch.randn(1, 3))  # one value per channel


def test_scores_and_no_grad_evaluation_match():
    loss_fn, params, tasks, inner = build("maml")
    score_fn = loss_fn.with_criterion(fmaml.accuracy)
    expected = fmaml.meta_loss(loss_fn, params, tasks, inner, score_fn=score_fn)
    expected = tuple(t.detach() for t in expected)
    for strategy in STRATEGIES.values():
        loss, _, score = fmaml.value_and_grad(
            loss_fn, params, tasks, inner, score_fn=score_fn, strategy=strategy
        )
        torch.testing.assert_close((loss, score), expected, rtol=1e-12, atol=1e-12)
        with torch.no_grad():  # value_and_grad differentiates whatever the grad mode
            value, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=strategy)
        assert not value.requires_grad
        assert all(g is not None for g in grads.params.values())
        torch.testing.assert_close(value, expected[0], rtol=1e-12, atol=1e-12)


def test_the_default_strategy_is_the_plain_vmap():
    loss_fn, params, tasks, inner = build("maml")
    loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=Strategy())
    assert loss.grad_fn is None and not loss.requires_grad  # a value, not a graph
    assert all(not g.requires_grad for g in grads.params.values())
    assert str(Strategy()) == "vmap over all tasks"


def test_auto_strategy_is_visible_and_per_device_and_model():
    conv_loss, *_ = build("maml")
    mlp_loss, *_ = build("maml", model_name="mlp")
    assert auto_strategy("cuda", conv_loss) == Strategy()
    cpu = auto_strategy("cpu", conv_loss)  # sizes not given: counted as large tasks
    assert cpu == Strategy(chunk_size=1, channels_last=True)
    assert auto_strategy("cpu", mlp_loss) == Strategy(threads=1) == auto_strategy("cpu")
    assert str(Strategy(chunk_size=8, checkpoint=True)) == (
        "vmap over chunks of 8 tasks, inner steps recomputed"
    )


def test_auto_strategy_vmaps_small_tasks_in_one_chunk_per_worker(monkeypatch):
    conv_loss, *_ = build("maml")
    monkeypatch.setattr(fmaml.engine.strategy, "available_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small = auto_strategy("cpu", conv_loss, num_tasks=32, examples_per_task=10)
        large = auto_strategy("cpu", conv_loss, num_tasks=32, examples_per_task=80)
        odd = auto_strategy("cpu", conv_loss, num_tasks=5, examples_per_task=10)
    finally:
        torch.set_num_threads(before)
    assert small == Strategy(chunk_size=16, workers=2)
    assert large == Strategy(chunk_size=1, channels_last=True)  # one graph alive at a time
    assert odd.chunk_size == 3  # chunks of 3 and 2 tasks, one per worker
    assert auto_strategy("cuda", conv_loss, num_tasks=32, examples_per_task=10) == Strategy()


def test_compile_refuses_batchnorm_before_compiling():
    loss_fn, params, tasks, inner = build("maml")  # conv4 has BatchNorm
    with pytest.raises(ValueError, match="refuses models with BatchNorm"):
        fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=Strategy(compile=True))
    assert str(Strategy(compile=True, threads=1)) == (
        "vmap over all tasks, compiled, 1 intra-op thread"
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"compile": True, "chunk_size": 1}, "`compile` compiles one vmap over all tasks"),
        ({"compile": True, "workers": 2}, "`compile` compiles one vmap over all tasks"),
        ({"compile": True, "checkpoint": True}, "`compile` compiles one vmap over all tasks"),
        ({"chunk_size": 0}, "`chunk_size` must be an integer of at least 1 or None"),
        ({"threads": 0}, "`threads` must be an integer of at least 1 or None"),
        ({"workers": 0}, "`workers` must be an integer of at least 1"),
        ({"chunk_size": 2.5}, "`chunk_size`"),
        ({"channels_last": True}, "`channels_last` applies to one task at a time"),
    ],
)
def test_strategy_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Strategy(**kwargs)


def test_strategies_refuse_torch_func_transforms_and_differentiable_tasks():
    loss_fn, params, tasks, inner = build("maml")
    names = list(params)

    def f(*leaves):
        loss, _ = fmaml.value_and_grad(
            loss_fn, dict(zip(names, leaves)), tasks, inner, strategy=Strategy(chunk_size=1)
        )
        return loss

    with pytest.raises(
        RuntimeError, match=r"value_and_grad\(\): .*can't run inside torch.func transforms"
    ):
        torch.func.grad(f)(*params.values())
    x = tasks.support[0].clone().requires_grad_()
    bad = fmaml.Task((x, tasks.support[1]), tasks.query)
    with pytest.raises(
        ValueError, match=r"value_and_grad\(\): .*a tensor of `tasks` requires grad"
    ):
        fmaml.value_and_grad(loss_fn, params, bad, inner, strategy=Strategy(chunk_size=1))


def test_threads_are_set_while_the_meta_batch_runs_and_restored():
    loss_fn, params, tasks, inner = build("maml")
    seen = []

    def counting(p, batch, **kw):
        seen.append(torch.get_num_threads())
        return loss_fn(p, batch, **kw)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        strategy = Strategy(chunk_size=1, threads=1)
        fmaml.value_and_grad(counting, params, tasks, inner, strategy=strategy)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("variant_name", ["maml", "fomaml", "anil", "metasgd"])
def test_plain_autograd_inner_steps_equal_torch_func_grad(variant_name):
    """One task at a time, the inner gradients come from torch.autograd.grad: the same
    adapted parameters and the same second derivatives as torch.func.grad's."""
    from fmaml.adapt import autograd_grad, func_grad, trajectory

    loss_fn, params, tasks, inner = build(variant_name)
    inner = inner.replace(num_steps=2)
    support = tuple(t[0] for t in tasks.support)
    task = fmaml.Task(support, tuple(t[0] for t in tasks.query))
    leaves = leaves_of(params, inner)

    def adapt(params, inner, grad):
        return trajectory(loss_fn, params, support, inner, grad=grad).params(inner.num_steps)

    def adapted_and_second_derivative(grad):
        adapted = adapt(params, inner, grad)
        total = sum((v**2).sum() for v in adapted.values())
        return adapted, torch.autograd.grad(total, leaves, allow_unused=True)

    expected, expected_grads = adapted_and_second_derivative(func_grad)
    got, got_grads = adapted_and_second_derivative(autograd_grad)
    detached = {k: v.detach() for k, v in params.items()}
    constant = adapt(detached, fmaml.InnerLoop(0.1), autograd_grad)
    with torch.no_grad():
        evaluated = adapt(params, inner, autograd_grad)
    # and the query loss through task_loss, with either grad
    reference = fmaml.task_loss(loss_fn, params, task, inner)
    plain = fmaml.task_loss(loss_fn, params, task, inner, grad=autograd_grad)
    torch.testing.assert_close(plain, reference, rtol=1e-12, atol=1e-14)
    expected_loss_grads = torch.autograd.grad(reference, leaves, allow_unused=True)
    got_loss_grads = torch.autograd.grad(plain, leaves, allow_unused=True)
    for a, b in zip(got_loss_grads, expected_loss_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(evaluated[k], expected[k], rtol=1e-12, atol=1e-14)
    for a, b in zip(got_grads, expected_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert not any(v.requires_grad for v in constant.values())
    # under no_grad the adapted tensors carry no graph (ANIL's frozen body comes back as is)
    assert not any(v.requires_grad for k, v in evaluated.items() if v is not params[k])


# --- exact or refused: captured tensors, list step weights, second derivatives ------------------


def captured_temperature_loss(kind, log_temp):
    """conv4's loss with the logits scaled by a temperature the criterion captures: the leaf
    ``log_temp`` itself, or a non-leaf computed outside the loss (``log_temp.exp()``), made
    anew for each call (its graph is the caller's)."""
    temp = log_temp if kind == "leaf" else log_temp.exp()
    torch.manual_seed(0)
    model = fmaml.nn.conv4(3, hidden=4, image_size=12).to(DTYPE)
    return fmaml.supervised_loss(model, lambda logits, y: F.cross_entropy(logits * temp, y))


def auto_strategies():
    """Both strategies auto_strategy returns on a CPU for conv4 (large and small tasks)."""
    loss_fn, *_ = build("maml")
    return [
        auto_strategy("cpu", loss_fn),
        auto_strategy("cpu", loss_fn, num_tasks=3, examples_per_task=15),
    ]


EVERY_STRATEGY = {**STRATEGIES, "auto-large-tasks": None, "auto-small-tasks": None}


def strategy_named(name):
    if name.startswith("auto-"):
        return auto_strategies()[0 if name == "auto-large-tasks" else 1]
    return STRATEGIES[name]


@pytest.mark.parametrize("params_require_grad", [True, False])
@pytest.mark.parametrize("kind", ["leaf", "non-leaf"])
@pytest.mark.parametrize("strategy_name", list(EVERY_STRATEGY))
def test_a_tensor_the_loss_captures_gets_the_pure_gradient_on_every_strategy(
    strategy_name, kind, params_require_grad
):
    """A learned temperature outside ``params``: every strategy finds the leaves the chunks
    reach and hands them their gradient, through the inner loop too (second order)."""
    _, params, tasks, inner = build("maml")
    inner = inner.replace(num_steps=2)
    if not params_require_grad:
        params = {k: v.detach() for k, v in params.items()}
    log_temp = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    leaves = [log_temp, *(v for v in params.values() if v.requires_grad)]

    loss_fn = captured_temperature_loss(kind, log_temp)
    expected_loss = fmaml.meta_loss(loss_fn, params, tasks, inner)
    expected = torch.autograd.grad(expected_loss, leaves)
    loss_fn = captured_temperature_loss(kind, log_temp)
    loss, grads = fmaml.value_and_grad(
        loss_fn, params, tasks, inner, wrt=leaves, strategy=strategy_named(strategy_name)
    )
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-12, atol=1e-12)
    assert expected[0].abs() > 1e-3  # the temperature matters, through the inner loop too
    for a, b in zip(grads.wrt, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # a captured tensor gets a gradient only when it is named in `wrt`
    loss_fn = captured_temperature_loss(kind, log_temp)
    _, unnamed = fmaml.value_and_grad(
        loss_fn, params, tasks, inner, strategy=strategy_named(strategy_name)
    )
    assert unnamed.wrt == [] and log_temp.grad is None


@pytest.mark.parametrize("strategy_name", list(EVERY_STRATEGY))
def test_a_loss_that_captures_params_and_rates_themselves_gets_the_pure_gradient(strategy_name):
    """A regulariser on a meta-parameter and a rate, captured by the loss: inside the inner
    loop they are constants of the support loss's gradient (as torch.func.grad sees them),
    and their own gradient adds to the one through the adapted parameters."""
    loss_fn, params, tasks, inner = build("metasgd")
    inner = inner.replace(num_steps=2)
    weight, rate = params["head.weight"], inner.inner_lr["head.bias"]
    regularised = loss_fn.with_criterion(  # a SupervisedLoss, as workers need
        lambda out, y: F.cross_entropy(out, y) + 0.1 * (weight**2).sum() + (rate**2).sum()
    )
    leaves = leaves_of(params, inner)
    expected = torch.autograd.grad(fmaml.meta_loss(regularised, params, tasks, inner), leaves)
    strategy = strategy_named(strategy_name)
    _, grads = fmaml.value_and_grad(
        regularised, params, tasks, inner, wrt=leaves, strategy=strategy
    )
    for a, b in zip(grads.wrt, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(
    shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler (c++)"
)
@pytest.mark.slow
def test_a_tensor_the_loss_captures_gets_the_pure_gradient_when_compiled():
    """Strategy(compile=True) on the sinusoid MLP (conv4 has BatchNorm, which compile
    refuses), a captured output scale, leaf and non-leaf. Compiles once (~1 min)."""
    torch.manual_seed(0)
    model = fmaml.nn.mlp(hidden=(8, 8)).to(DTYPE)
    _, params, tasks, inner = build("metasgd", model_name="mlp")
    inner = inner.replace(num_steps=2)
    log_scale = torch.tensor(0.2, dtype=DTYPE, requires_grad=True)
    leaves = [log_scale, *leaves_of(params, inner)]
    for kind in ["leaf", "non-leaf"]:
        grads = []
        for strategy in [None, Strategy(compile=True)]:
            scale = log_scale if kind == "leaf" else log_scale.exp()
            loss_fn = fmaml.supervised_loss(
                model, lambda out, y, scale=scale: F.mse_loss(out * scale, y)
            )
            if strategy is None:  # the definition
                loss = fmaml.meta_loss(loss_fn, params, tasks, inner)
                grads.append(torch.autograd.grad(loss, leaves))
            else:
                _, got = fmaml.value_and_grad(
                    loss_fn, params, tasks, inner, wrt=leaves, strategy=strategy
                )
                grads.append(got.wrt)
        assert grads[0][0].abs() > 1e-3
        for a, b in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_a_captured_tensor_under_first_order_gets_the_pure_first_order_gradient():
    _, params, tasks, inner = build("fomaml")
    log_temp = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    leaves = [log_temp, *params.values()]
    loss_fn = captured_temperature_loss("non-leaf", log_temp)
    grads = [torch.autograd.grad(fmaml.meta_loss(loss_fn, params, tasks, inner), leaves)]
    for strategy in [Strategy(chunk_size=1), Strategy(chunk_size=1, checkpoint=True)]:
        loss_fn = captured_temperature_loss("non-leaf", log_temp)
        _, got = fmaml.value_and_grad(loss_fn, params, tasks, inner, wrt=leaves, strategy=strategy)
        grads.append(got.wrt)
    for got in grads[1:]:
        for a, b in zip(got, grads[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_a_tensor_handed_out_twice_is_refused_by_strategies():
    """``inner_lr = log_lr.exp()`` while ``log_lr`` is in ``wrt`` too (the loss captures
    it): ``log_lr`` would get its total gradient and ``inner_lr`` its own, which flows on to
    ``log_lr`` again. Refused; the pure path is right."""
    _, params, tasks, inner = build("maml")
    log_lr = torch.tensor(-2.0, dtype=DTYPE, requires_grad=True)
    loss_fn = captured_temperature_loss("leaf", log_lr)
    fmaml.meta_loss(loss_fn, params, tasks, inner.replace(inner_lr=log_lr.exp())).backward()
    assert log_lr.grad is not None
    for strategy in [Strategy(chunk_size=1), Strategy(chunk_size=1, checkpoint=True)]:
        with pytest.raises(
            ValueError,
            match=r"(?s)value_and_grad\(\): a tensor of `inner_lr` \(shape \[\], torch.float64\) "
            r"is computed from a tensor of `wrt` .*counted twice",
        ):
            fmaml.value_and_grad(
                loss_fn,
                params,
                tasks,
                inner.replace(inner_lr=log_lr.exp()),
                wrt=[log_lr],
                strategy=strategy,
            )
    weight = torch.tensor(0.5, dtype=DTYPE, requires_grad=True)
    weighted = inner.replace(inner_lr=0.1, num_steps=2, step_weights=[weight, weight * 2])
    with pytest.raises(
        ValueError,
        match=r"value_and_grad\(\): a tensor of `step_weights` .* is computed from .*counted twice",
    ):
        fmaml.value_and_grad(loss_fn, params, tasks, weighted, strategy=Strategy(chunk_size=2))


STEP_WEIGHT_LISTS = {
    "0-d-tensors": lambda: [torch.tensor(w, dtype=DTYPE, requires_grad=True) for w in (0.2, 0.3)],
    "tensor-and-float": lambda: [torch.tensor(0.4, dtype=DTYPE, requires_grad=True), 0.6],
}


@pytest.mark.parametrize("weights_name", list(STEP_WEIGHT_LISTS))
@pytest.mark.parametrize("strategy_name", ["pure", *STRATEGIES])
def test_step_weights_as_a_list_of_tensors_get_their_gradient_on_every_path(
    strategy_name, weights_name
):
    """Each learnable 0-d weight of a list gets the gradient the same weights get as one
    stacked tensor on the pure path."""
    loss_fn, params, tasks, inner = build("maml")
    inner = inner.replace(num_steps=2)
    weights = STEP_WEIGHT_LISTS[weights_name]()
    learned = [i for i, w in enumerate(weights) if isinstance(w, torch.Tensor)]
    values = [float(w.detach()) if isinstance(w, torch.Tensor) else w for w in weights]
    stacked = torch.tensor(values, dtype=DTYPE, requires_grad=True)
    reference = fmaml.meta_loss(loss_fn, params, tasks, inner.replace(step_weights=stacked))
    expected = torch.autograd.grad(reference, [stacked, *params.values()])
    leaves = [*(weights[i] for i in learned), *params.values()]
    listed = inner.replace(step_weights=weights)
    if strategy_name == "pure":
        loss = fmaml.meta_loss(loss_fn, params, tasks, listed)
        got = torch.autograd.grad(loss, leaves)
    else:
        loss, grads = fmaml.value_and_grad(
            loss_fn, params, tasks, listed, strategy=STRATEGIES[strategy_name]
        )
        # each weight's gradient in its place in the list, None for a number
        assert [g is not None for g in grads.step_weights] == [
            i in learned for i in range(len(weights))
        ]
        got = [grads.step_weights[i] for i in learned] + [grads.params[k] for k in params]
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack(got[: len(learned)]), expected[0][learned])
    assert expected[0].abs().min() > 1e-3
    for a, b in zip(got[len(learned) :], expected[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def hessian_vector_product(meta_loss_of, values, direction):
    """``d/dθ <∇L(θ), v>`` by double backward through ``meta_loss_of(values)``."""
    grads = torch.autograd.grad(meta_loss_of(values), values, create_graph=True)
    along = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
    return torch.autograd.grad(along, values)


def test_the_pure_meta_loss_gives_hessian_vector_products_on_the_mlp():
    """Second derivatives of the meta-loss (third of the inner loss) through meta_loss,
    strategy=None, a captured output scale included: central finite differences of the
    meta-gradient (float64; the sinusoid MLP is smooth enough for them)."""
    _, params, tasks, inner = build("maml", model_name="mlp")
    inner = inner.replace(num_steps=2)
    names = list(params)
    torch.manual_seed(0)
    model = fmaml.nn.mlp(hidden=(8, 8)).to(DTYPE)

    def meta_loss_of(values):
        *weights, log_scale = values
        scale = log_scale.exp()  # a non-leaf the loss captures
        loss_fn = fmaml.supervised_loss(model, lambda out, y: F.mse_loss(out * scale, y))
        return fmaml.meta_loss(loss_fn, dict(zip(names, weights, strict=True)), tasks, inner)

    values = [*params.values(), torch.tensor(0.2, dtype=DTYPE, requires_grad=True)]
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(v.shape, generator=g, dtype=DTYPE) for v in values]
    hvp = hessian_vector_product(meta_loss_of, values, direction)

    def meta_gradient_at(sign, eps=1e-5):
        moved = [(v + sign * eps * d).detach().requires_grad_() for v, d in zip(values, direction)]
        return torch.autograd.grad(meta_loss_of(moved), moved)

    finite = [(a - b) / 2e-5 for a, b in zip(meta_gradient_at(1), meta_gradient_at(-1))]
    assert hvp[-1].abs() > 1e-3
    for a, b in zip(hvp, finite, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_the_pure_meta_loss_gives_hessian_vector_products_on_conv4():
    """The same on conv4 with BatchNorm and a captured temperature, against an independent
    oracle: a Python loop over tasks with torch.autograd.grad(create_graph=True) inner steps
    and BatchNorm by ops (``stat_rows``), double-backwarded. (Finite differences are no
    oracle here: max-pool and ReLU kinks on these tiny images.)"""
    from fmaml.nn.batchnorm import with_stat_rows

    _, params, tasks, inner = build("maml")
    inner = inner.replace(num_steps=2)
    names = list(params)
    values = [*params.values(), torch.tensor(0.3, dtype=DTYPE, requires_grad=True)]
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(v.shape, generator=g, dtype=DTYPE) for v in values]

    def pure(values):
        *weights, log_temp = values
        loss_fn = captured_temperature_loss("non-leaf", log_temp)
        return fmaml.meta_loss(loss_fn, dict(zip(names, weights, strict=True)), tasks, inner)

    module = captured_temperature_loss("leaf", values[-1]).module

    def oracle(values):
        *weights, log_temp = values
        temp = log_temp.exp()

        def loss(fast, x, y):
            out = torch.func.functional_call(with_stat_rows(module, x.shape[0]), fast, (x,))
            return F.cross_entropy(out * temp, y)

        total = 0.0
        for t in range(tasks.query[0].shape[0]):
            fast = dict(zip(names, weights, strict=True))
            for _ in range(2):
                step = torch.autograd.grad(
                    loss(fast, tasks.support[0][t], tasks.support[1][t]),
                    list(fast.values()),
                    create_graph=True,
                )
                fast = {k: v - 0.1 * d for (k, v), d in zip(fast.items(), step, strict=True)}
            total = total + loss(fast, tasks.query[0][t], tasks.query[1][t])
        return total / tasks.query[0].shape[0]

    expected = hessian_vector_product(oracle, values, direction)
    got = hessian_vector_product(pure, values, direction)
    assert expected[-1].abs() > 1e-3
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_auto_strategy_has_a_worker_per_core_it_may_use(monkeypatch):
    conv_loss, *_ = build("maml")
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(fmaml.engine.strategy, "available_cores", lambda: 8)
        torch.set_num_threads(8)
        many = auto_strategy("cpu", conv_loss, num_tasks=32, examples_per_task=10)
        assert many == Strategy(chunk_size=4, workers=8)
        few = auto_strategy("cpu", conv_loss, num_tasks=3, examples_per_task=10)
        assert few == Strategy(chunk_size=1, workers=3)  # no more workers than tasks
        # large tasks: each op on all of torch's threads, whatever the cores
        large = auto_strategy("cpu", conv_loss, num_tasks=4, examples_per_task=80)
        assert large == Strategy(chunk_size=1, channels_last=True)
        torch.set_num_threads(2)  # torch may use 2 of the 8 cores
        assert auto_strategy("cpu", conv_loss, num_tasks=32, examples_per_task=10).workers == 2
        monkeypatch.setattr(fmaml.engine.strategy, "available_cores", lambda: 2)
        torch.set_num_threads(4)  # more threads than cores: one worker per core
        small = auto_strategy("cpu", conv_loss, num_tasks=32, examples_per_task=10)
        assert small == Strategy(chunk_size=16, workers=2)
    finally:
        torch.set_num_threads(before)


def test_strategies_leave_threads_warning_filters_and_random_state_as_they_were():
    _, params, tasks, inner = build("maml")
    threads, filters, rng = torch.get_num_threads(), list(warnings.filters), torch.get_rng_state()
    for strategy in [*STRATEGIES.values(), Strategy(chunk_size=1, threads=1)]:
        loss_fn = captured_temperature_loss("leaf", torch.tensor(1.0, dtype=DTYPE))
        fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=strategy)
    assert torch.get_num_threads() == threads
    assert warnings.filters == filters
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow
def test_import_fmaml_loads_neither_pil_click_nor_matplotlib():
    code = (
        "import sys, fmaml\n"
        "print(sorted(m for m in sys.modules if m in ('PIL', 'click', 'matplotlib') "
        "or m.startswith(('fmaml.training', 'fmaml.bench'))))\n"
        "fmaml.tasks.EpisodeSampler, fmaml.tasks.DataError, fmaml.TrainConfig, fmaml.fit\n"
        "from fmaml import TrainState, evaluate_state, restore_state\n"
        "from fmaml.tasks import ClassImages, load_splits\n"
        "print('PIL' in sys.modules)\n"
    )
    root = str(Path(fmaml.__file__).resolve().parents[1])  # this checkout's fmaml
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "True"]
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        fmaml.nonexistent  # noqa: B018
