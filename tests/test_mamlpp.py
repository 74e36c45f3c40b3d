"""MAML++ (Antoniou et al. 2019): each fix is a setting, reduces to MAML, and is exact."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest_images import make_omniglot
from torch import nn

import fmaml
from fmaml.schedules import cosine_lr, first_order_at, msl_weights
from fmaml.training.checkpoint import load_checkpoint
from fmaml.training.cli import main
from fmaml.training.config import TrainConfig
from fmaml.training.train import init_state, train

DTYPE = torch.float64


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(DTYPE)


def make_tasks(num_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num_tasks, 6, 1, 6, 6, generator=g, dtype=DTYPE)
    xq = torch.randn(num_tasks, 9, 1, 6, 6, generator=g, dtype=DTYPE)
    ys = torch.arange(3).repeat(2).expand(num_tasks, -1)
    yq = torch.arange(3).repeat(3).expand(num_tasks, -1)
    return fmaml.Task((xs, ys), (xq, yq))


def mamlpp_setup(num_steps=3, support_statistics=False):
    model = make_model()
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    if support_statistics:
        loss_fn = loss_fn.with_support_statistics()
    bn_keys = loss_fn.batchnorm_keys()
    stepwise, params = fmaml.per_step(loss_fn, fmaml.params_of(model), bn_keys, num_steps)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct slots, so a slot mix-up would show
        for k in bn_keys:
            params[k].add_(0.1 * torch.randn(params[k].shape, generator=g, dtype=DTYPE))
    adapt_keys = [k for k in params if k not in bn_keys]
    rates = fmaml.init_rates(
        params, 0.1, adapt_keys=adapt_keys, per_element=False, num_steps=num_steps
    )
    with torch.no_grad():
        for step in rates:
            for r in step.values():
                r.add_(0.05 * torch.rand((), generator=g, dtype=DTYPE))
    return model, stepwise, params, rates, adapt_keys


# --- an independent oracle: plain autograd, hand-written forward --------------------------------


def oracle_forward(p, x, step, stats_x=None):
    """conv -> BatchNorm (per-step weights; statistics from stats_x if given) -> ReLU -> linear."""
    n = 0 if stats_x is None else stats_x.shape[0]
    h = F.conv2d(x if stats_x is None else torch.cat([stats_x, x]), p["0.weight"], p["0.bias"])
    source = h if stats_x is None else h[:n]
    mean = source.mean(dim=(0, 2, 3), keepdim=True)
    var = source.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    slot = min(step, p["1.weight"].shape[0] - 1)
    h = (h - mean) / torch.sqrt(var + 1e-5)
    h = h * p["1.weight"][slot].view(1, -1, 1, 1) + p["1.bias"][slot].view(1, -1, 1, 1)
    out = F.linear(torch.relu(h).flatten(1), p["4.weight"], p["4.bias"])
    return out[n:]


def oracle_meta_grad(params, rates, adapt_keys, tasks, step_weights, support_statistics):
    leaves = list(params.values()) + [r for step in rates for r in step.values()]
    total = 0.0
    num_tasks = tasks.support[0].shape[0]
    for t in range(num_tasks):
        xs, ys = tasks.support[0][t], tasks.support[1][t]
        xq, yq = tasks.query[0][t], tasks.query[1][t]
        fast = dict(params)
        task_total = 0.0
        for step, rate in enumerate(rates):
            loss = F.cross_entropy(oracle_forward(fast, xs, step), ys)
            grads = torch.autograd.grad(loss, [fast[k] for k in adapt_keys], create_graph=True)
            for k, g in zip(adapt_keys, grads):
                fast[k] = fast[k] - rate[k] * g
            stats = xs if support_statistics else None
            query_loss = F.cross_entropy(oracle_forward(fast, xq, step + 1, stats), yq)
            task_total = task_total + step_weights[step] * query_loss
        total = total + task_total / num_tasks
    return torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("support_statistics", [False, True])
def test_mamlpp_meta_gradient_equals_oracle(support_statistics):
    _, loss_fn, params, rates, adapt_keys = mamlpp_setup(3, support_statistics)
    tasks = make_tasks()
    weights = msl_weights(3, epoch=2, msl_epochs=10)
    loss = fmaml.meta_loss(
        loss_fn,
        params,
        tasks,
        fmaml.InnerLoop(rates, num_steps=3, adapt_keys=adapt_keys, step_weights=weights),
    )
    leaves = list(params.values()) + [r for step in rates for r in step.values()]
    ours = torch.autograd.grad(loss, leaves)
    reference = oracle_meta_grad(params, rates, adapt_keys, tasks, weights, support_statistics)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    rate_grads = ours[len(params) :]
    assert all(g.abs() > 0 for g in rate_grads), "every learned rate gets a meta-gradient"
    bn_grad = ours[list(params).index("1.weight")]
    assert (bn_grad.abs().sum(dim=1) > 0).all(), "every per-step BN slot gets a meta-gradient"


def test_mamlpp_vmap_equals_loop_and_is_pure():
    _, loss_fn, params, rates, adapt_keys = mamlpp_setup(2, support_statistics=True)
    tasks = make_tasks()
    before = {k: v.detach().clone() for k, v in params.items()}
    inner = fmaml.InnerLoop(rates, num_steps=2, adapt_keys=adapt_keys, step_weights=[0.3, 0.7])
    batched = fmaml.meta_loss(loss_fn, params, tasks, inner)
    looped = (
        sum(
            fmaml.task_loss(
                loss_fn,
                params,
                fmaml.Task(tuple(x[t] for x in tasks.support), tuple(x[t] for x in tasks.query)),
                inner,
            )
            for t in range(3)
        )
        / 3
    )
    torch.testing.assert_close(batched, looped)
    assert all(torch.equal(params[k].detach(), before[k]) for k in params)


# --- each fix reduces to MAML at its special setting ------------------------------------------


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


def test_per_step_bn_with_one_shared_copy_is_maml():
    model = make_model()
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    params = fmaml.params_of(model)
    stepwise, stacked = fmaml.per_step(loss_fn, params, loss_fn.batchnorm_keys(), 3)
    tasks = make_tasks()
    # BatchNorm out of the inner loop, as in MAML++ and the MAML authors' code: a per-step
    # slot is never reused at a later step, so adapting it could not match a shared copy.
    body = [k for k in params if k not in stepwise.per_step_keys]
    maml = fmaml.meta_loss(
        loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=3, adapt_keys=body)
    )
    ours = fmaml.meta_loss(
        stepwise, stacked, tasks, fmaml.InnerLoop(0.1, num_steps=3, adapt_keys=body)
    )
    torch.testing.assert_close(ours, maml, rtol=1e-12, atol=0)
    ours_grads = grads(ours, list(stacked.values()))
    maml_grads = grads(maml, list(params.values()))
    for k, a, b in zip(stacked, ours_grads, maml_grads):
        a = a.sum(dim=0) if k in stepwise.per_step_keys else a
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=k)


def test_constant_lslr_rates_and_last_step_weights_are_maml():
    model = make_model()
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    params = fmaml.params_of(model)
    tasks = make_tasks()
    rates = fmaml.init_rates(params, 0.1, per_element=False, num_steps=3)
    lslr = fmaml.meta_loss(
        loss_fn, params, tasks, fmaml.InnerLoop(rates, num_steps=3, step_weights=[0.0, 0.0, 1.0])
    )
    maml = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=3))
    for a, b in zip(grads(lslr, list(params.values())), grads(maml, list(params.values()))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_step_weight_of_the_number_zero_leaves_that_step_out():
    """``step_weights=[0, 1]`` is MAML with 2 steps, in the definition and on every path:
    the first query loss is not computed at all, so a NaN there does not poison the loss
    (``0 * nan`` would be NaN)."""
    from fmaml.types import LossOptions

    class NanAfterOneStep:
        """½‖w − x‖², times NaN on the query (``y`` 0) after one inner step."""

        options = LossOptions(stepwise=True)

        def __call__(self, params, batch, step=0):
            x, y = batch
            loss = 0.5 * ((params["w"] - x) ** 2).sum()
            return loss * (y / y).mean() if step == 1 else loss

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, generator=g, dtype=DTYPE, requires_grad=True)
    c_s, c_q = torch.randn(2, 3, 4, generator=g, dtype=DTYPE)
    ones, zeros = torch.ones(3, 4, dtype=DTYPE), torch.zeros(3, 4, dtype=DTYPE)
    tasks = fmaml.Task(support=(c_s, ones), query=(c_q, zeros))
    loss_fn, params = NanAfterOneStep(), {"w": w}
    maml = fmaml.InnerLoop(0.3, num_steps=2)
    expected = fmaml.meta_loss(loss_fn, params, tasks, maml)
    (expected_grad,) = torch.autograd.grad(expected, [w])
    assert torch.isfinite(expected) and torch.isfinite(expected_grad).all()
    weighted = maml.replace(step_weights=[0, 1])
    loss = fmaml.meta_loss(loss_fn, params, tasks, weighted)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads(loss, [w])[0], expected_grad, rtol=1e-12, atol=1e-14)
    for strategy in (fmaml.Strategy(), fmaml.Strategy(chunk_size=1, checkpoint=True)):
        value, got = fmaml.value_and_grad(loss_fn, params, tasks, weighted, strategy=strategy)
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.params["w"], expected_grad, rtol=1e-12, atol=1e-14)
    # the NaN is there: a weight that is a tensor zero (or any other weight) meets it
    poisoned = fmaml.meta_loss(loss_fn, params, tasks, maml.replace(step_weights=[0.5, 0.5]))
    assert torch.isnan(poisoned)


def test_da_switched_off_is_second_order(monkeypatch):
    seen = []
    import fmaml.training.train as train_module

    real = train_module.value_and_grad

    def spy(*args, **kwargs):
        seen.append(args[3].first_order)  # the InnerLoop the step runs
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "value_and_grad", spy)
    for da_epochs, expected in ((0, [False, False, False]), (1, [True, True, False])):
        seen.clear()
        state = init_state(
            TrainConfig(
                dataset="sinusoid",
                algorithm="mamlpp",
                meta_batch=2,
                hidden=8,
                iterations=3,
                iterations_per_epoch=2,
                da_epochs=da_epochs,
            )
        )
        for _ in range(3):
            train_module.meta_step(state)
        assert seen == expected


# --- schedules ---------------------------------------------------------------------------------


def test_msl_schedule_follows_the_reference_implementation():
    assert msl_weights(5, 0, 10) == [0.2] * 5
    for epoch in range(10):
        weights = msl_weights(5, epoch, 10)
        assert abs(sum(weights) - 1) < 1e-12
        assert weights[-1] >= weights[0] >= 0.03 / 5 - 1e-15
    late = msl_weights(5, 9, 10)
    assert late[0] == pytest.approx(max(0.2 - 9 * 0.02, 0.006))
    assert msl_weights(5, 10, 10) is None and msl_weights(5, 0, 0) is None
    assert msl_weights(1, 0, 10) is None


def test_cosine_and_da_schedules():
    values = [cosine_lr(i, 100, 1e-3, 1e-5) for i in range(101)]
    assert values[0] == pytest.approx(1e-3) and values[-1] == pytest.approx(1e-5)
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[50] == pytest.approx((1e-3 + 1e-5) / 2)
    assert first_order_at(0, 50) and not first_order_at(50, 50) and not first_order_at(0, 0)


def test_cosine_annealing_sets_the_outer_rate(tmp_path):
    state = train(
        TrainConfig(
            dataset="sinusoid",
            algorithm="mamlpp",
            meta_batch=2,
            hidden=8,
            iterations=10,
            val_every=10,
            val_episodes=4,
        ),
        tmp_path,
    )
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(cosine_lr(9, 10, 1e-3, 1e-5))


@pytest.mark.slow
def test_mamlpp_resume_is_exact(tmp_path):
    config = TrainConfig(
        dataset="sinusoid",
        algorithm="mamlpp",
        meta_batch=2,
        hidden=8,
        iterations=12,
        val_every=6,
        val_episodes=4,
        checkpoint_every=6,
        iterations_per_epoch=4,
        da_epochs=1,
        msl_epochs=2,
    )
    whole = train(config, tmp_path / "whole")
    train(config, tmp_path / "parts", iterations=6)
    resumed = train(None, tmp_path / "parts", resume=True)
    for a, b in zip(whole.leaves(), resumed.leaves()):
        assert torch.equal(a, b)


# --- BatchNorm statistics: what is used at evaluation, and no leak from the query ---------------


def test_support_statistics_do_not_leak_between_query_examples():
    model = fmaml.nn.conv4(5, hidden=8)
    params = fmaml.params_of(model)
    support, query = torch.rand(5, 1, 28, 28), torch.rand(10, 1, 28, 28)
    changed = query.clone()
    changed[5:] = torch.rand(5, 1, 28, 28)
    leak_free = fmaml.supervised_loss(model, F.cross_entropy).with_support_statistics()
    a = leak_free.predict(params, query, stats_from=support)
    b = leak_free.predict(params, changed, stats_from=support)
    torch.testing.assert_close(a[:5], b[:5])
    transductive = fmaml.supervised_loss(model, F.cross_entropy)
    assert not torch.allclose(
        transductive.predict(params, query)[:5], transductive.predict(params, changed)[:5]
    )


def test_evaluation_has_no_running_state_to_leak_through():
    """No running statistics: scoring episodes never changes the model or later episodes."""
    model = make_model()
    module_state = {k: v.clone() for k, v in model.state_dict().items()}
    _, loss_fn, params, rates, adapt_keys = mamlpp_setup(2, support_statistics=True)
    score_fn = loss_fn.with_criterion(fmaml.accuracy)
    first, second = make_tasks(seed=1), make_tasks(seed=2)
    inner = fmaml.InnerLoop(rates, num_steps=2, adapt_keys=adapt_keys)
    alone = fmaml.evaluate(score_fn, loss_fn, params, [second], inner)
    after = fmaml.evaluate(score_fn, loss_fn, params, [first, second], inner)[3:]
    torch.testing.assert_close(alone, after)
    assert not list(loss_fn.module.buffers()), "no running statistics exist to be updated"
    for k, v in make_model().state_dict().items():
        assert torch.equal(v, module_state[k])


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--algorithm", "mamlpp"],
            dict(
                lslr=True,
                per_step_bn=True,
                bn_statistics="support",
                cosine_annealing=True,
                da_epochs=50,
                msl_epochs=10,
            ),
        ),
        (
            [
                "--algorithm",
                "mamlpp",
                "--no-lslr",
                "--no-per-step-bn",
                "--bn-statistics",
                "batch",
                "--no-cosine-annealing",
                "--da-epochs",
                "0",
                "--msl-epochs",
                "0",
            ],
            dict(
                lslr=False,
                per_step_bn=False,
                bn_statistics="batch",
                cosine_annealing=False,
                da_epochs=0,
                msl_epochs=0,
            ),
        ),
        (
            ["--algorithm", "maml", "--lslr", "--msl-epochs", "3"],
            dict(lslr=True, per_step_bn=False, msl_epochs=3, da_epochs=0),
        ),
    ],
)
def test_each_fix_is_a_cli_switch(tmp_path, isolated_cache, flags, expected):
    make_omniglot(tmp_path / "omni", {f"A{i}": 3 for i in range(4)}, images_per_character=4)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--data-root",
            str(tmp_path / "omni"),
            "--ways",
            "2",
            "--meta-batch",
            "2",
            "--hidden",
            "4",
            "--inner-steps",
            "2",
            "--iterations",
            "2",
            "--val-every",
            "2",
            "--val-episodes",
            "2",
            "--no-download",
            "--out",
            str(run),
            *flags,
        ],
    )
    assert result.exit_code == 0, result.output
    saved = load_checkpoint(run / "latest.pt")
    for key, value in expected.items():
        assert saved["config"][key] == value, key
    per_step = saved["params"]["body.block0.norm.weight"].dim() == 2
    assert per_step == expected["per_step_bn"]
    assert isinstance(saved["rates"], list) == expected["lslr"]
