"""Reptile (Nichol, Achiam & Schulman 2018) as ``objective="reptile"``: closed forms, an
independent autograd oracle, every strategy, frozen keys, the training loop and the CLI."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest_images import make_omniglot
from hypothesis import given, settings
from test_core import setup as core_setup

import fmaml
from fmaml.algorithms import get_algorithm, head_keys
from fmaml.errors import ConfigError
from fmaml.training.cli import main
from fmaml.training.config import TrainConfig, resolve
from fmaml.training.train import evaluate_state, init_state, meta_gradient, train

DTYPE = torch.float64


def sinusoid_setup(num_tasks=4, seed=0):
    torch.manual_seed(seed)
    model = fmaml.nn.mlp(hidden=(8, 8)).to(DTYPE)
    params = fmaml.params_of(model)
    g = torch.Generator().manual_seed(seed)
    tasks = fmaml.tasks.SinusoidTasks(num_shots=5).sample(num_tasks, g)
    tasks = fmaml.Task(*(tuple(t.to(DTYPE) for t in pair) for pair in tasks))
    return params, fmaml.supervised_loss(model, F.mse_loss), tasks


def conv_setup(num_tasks=3, seed=0):
    """test_core's conv4 meta-batch (3-way, 2 support and 3 query per class, float64)."""
    _, params, loss_fn, tasks = core_setup(num_tasks, seed)
    return params, loss_fn, tasks


def task_at(tasks, t):
    return fmaml.Task(*(tuple(x[t] for x in pair) for pair in tasks))


def num_tasks(tasks):
    return tasks.support[0].shape[0]


def direction(loss_fn, params, tasks, inner, strategy=None):
    """Reptile's direction as fmaml computes it: the gradient of the meta-loss (by the
    definition, or by value_and_grad with ``strategy``)."""
    if strategy is not None:
        _, grads = fmaml.value_and_grad(
            loss_fn, params, tasks, inner, objective="reptile", strategy=strategy
        )
        return grads.params
    loss = fmaml.meta_loss(loss_fn, params, tasks, inner, objective="reptile")
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def oracle_direction(loss_fn, params, tasks, inner_lr, num_steps, adapt_keys=None):
    """An independent computation: a Python loop over tasks, plain SGD with
    ``torch.autograd.grad`` on the support, then the mean of ``params - adapted``."""
    moved = [k for k in params if adapt_keys is None or adapt_keys(k)]
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(num_tasks(tasks)):
        support = task_at(tasks, t).support
        w = {k: v.detach().clone() for k, v in params.items()}
        for _ in range(num_steps):
            leaves = {k: w[k].requires_grad_() for k in moved}
            grads = torch.autograd.grad(loss_fn({**w, **leaves}, support), list(leaves.values()))
            w = {**w, **{k: (leaves[k] - inner_lr * g).detach() for k, g in zip(moved, grads)}}
        for k in params:
            total[k] += params[k].detach() - w[k]
    return {k: v / num_tasks(tasks) for k, v in total.items()}


def assert_dicts_close(a, b, **kwargs):
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kwargs, msg=lambda m, k=k: f"{k}: {m}")


# --- (1) one step: inner_lr times the mean support gradient (joint training) --------------------


@pytest.mark.parametrize("setup", [sinusoid_setup, conv_setup])
def test_one_step_is_inner_lr_times_the_mean_support_gradient(setup):
    params, loss_fn, tasks = setup()
    inner_lr = 0.3
    got = direction(loss_fn, params, tasks, fmaml.InnerLoop(inner_lr, num_steps=1))
    # joint training: the gradient of the mean support loss at params, by plain autograd
    joint = sum(
        loss_fn(params, task_at(tasks, t).support) for t in range(num_tasks(tasks))
    ) / num_tasks(tasks)
    grads = torch.autograd.grad(joint, list(params.values()))
    expected = {k: inner_lr * g for k, g in zip(params, grads, strict=True)}
    assert_dicts_close(got, expected)
    assert any(v.abs().max() > 1e-3 for v in got.values())  # not trivially zero


@pytest.mark.parametrize("setup", [sinusoid_setup, conv_setup])
@pytest.mark.parametrize("num_steps", [2, 3])
def test_several_steps_match_an_autograd_loop(setup, num_steps):
    params, loss_fn, tasks = setup()
    got = direction(loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=num_steps))
    assert_dicts_close(got, oracle_direction(loss_fn, params, tasks, 0.1, num_steps))
    # more than one step is not joint training
    one = direction(loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=1))
    first = next(iter(params))
    assert not torch.allclose(got[first], num_steps * one[first])


# --- (2) the paper's Taylor terms, exact on a quadratic -----------------------------------------


def quadratic_loss(params, batch):
    """``L(w) = 1/2 (w - c)^T A (w - c)`` with the task's ``batch = (A [d, d], c [d])``."""
    a, c = batch
    r = params["w"] - c
    return 0.5 * r @ (a @ r)


def quadratic_tasks(num_tasks, dim, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(num_tasks, dim, dim, generator=g, dtype=DTYPE)
    a = m @ m.transpose(1, 2) / dim + 0.1 * torch.eye(dim, dtype=DTYPE)  # symmetric positive
    c = torch.randn(num_tasks, dim, generator=g, dtype=DTYPE)
    w = torch.randn(dim, generator=g, dtype=DTYPE, requires_grad=True)
    return {"w": w}, fmaml.Task(support=(a, c), query=(a, c))


@settings(max_examples=25, deadline=None)
@given(
    num_tasks=st.integers(1, 4),
    dim=st.integers(1, 5),
    rate=st.floats(0.01, 0.5),
    seed=st.integers(0, 2**16),
)
def test_two_steps_are_the_papers_taylor_terms_on_a_quadratic(num_tasks, dim, rate, seed):
    r"""Two SGD steps at rate a on L_t: w_1 = w - a g_1, g_1 = A_t (w - c_t), and
    g_2 = g(w_1) = A_t (w - a g_1 - c_t) = g_1 - a A_t g_1: the paper's g_2 = gbar + Hbar
    (w_1 - w) = gbar - a Hbar gbar (its section 5) with no remainder, since the Hessian
    A_t is constant. So w - w_2 = a g_1 + a g_2 = 2a gbar - a^2 Hbar gbar, exactly."""
    params, tasks = quadratic_tasks(num_tasks, dim, seed)
    a, c = tasks.support
    w = params["w"].detach()
    gbar = torch.einsum("tij,tj->ti", a, w - c)  # the gradient at w, per task
    hbar_gbar = torch.einsum("tij,tj->ti", a, gbar)  # the Hessian times it
    expected = (2 * rate * gbar - rate**2 * hbar_gbar).mean(0)
    got = direction(quadratic_loss, params, tasks, fmaml.InnerLoop(rate, num_steps=2))["w"]
    torch.testing.assert_close(got, expected)
    # the second-order term is there: dropping it (joint training over two steps) differs
    if not torch.allclose(hbar_gbar.mean(0), torch.zeros(dim, dtype=DTYPE), atol=1e-6):
        assert not torch.allclose(got, (2 * rate * gbar).mean(0))


@settings(max_examples=20, deadline=None)
@given(num_steps=st.integers(1, 5), rate=st.floats(0.01, 0.5), seed=st.integers(0, 2**16))
def test_k_steps_on_a_quadratic_in_closed_form(num_steps, rate, seed):
    """w - c - (w_k - c) with w_k - c = (I - a A)^k (w - c): the whole series, summed."""
    params, tasks = quadratic_tasks(3, 3, seed)
    a, c = tasks.support
    w = params["w"].detach()
    eye = torch.eye(3, dtype=DTYPE)
    contraction = torch.linalg.matrix_power(eye - rate * a, num_steps)
    expected = torch.einsum("tij,tj->ti", eye - contraction, w - c).mean(0)
    got = direction(quadratic_loss, params, tasks, fmaml.InnerLoop(rate, num_steps=num_steps))["w"]
    torch.testing.assert_close(got, expected)


# --- (3) vmap equals a Python loop; every strategy gives the same direction ----------------------


@pytest.mark.parametrize("setup", [sinusoid_setup, conv_setup])
def test_vmap_equals_a_python_loop(setup):
    params, loss_fn, tasks = setup()
    inner = fmaml.InnerLoop(0.1, num_steps=2)
    batched = fmaml.meta_loss(loss_fn, params, tasks, inner, objective="reptile")
    looped = sum(
        fmaml.reptile_loss(loss_fn, params, task_at(tasks, t), inner)
        for t in range(num_tasks(tasks))
    ) / num_tasks(tasks)
    torch.testing.assert_close(batched, looped)
    grads = torch.autograd.grad(looped, list(params.values()))
    assert_dicts_close(
        direction(loss_fn, params, tasks, inner), dict(zip(params, grads, strict=True))
    )


STRATEGIES = [
    fmaml.Strategy(chunk_size=1),
    fmaml.Strategy(chunk_size=2),
    fmaml.Strategy(chunk_size=1, checkpoint=True),
    fmaml.Strategy(chunk_size=2, checkpoint=True),
    fmaml.Strategy(chunk_size=1, workers=2),
]


@pytest.mark.parametrize("setup", [sinusoid_setup, conv_setup])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_every_strategy_gives_the_plain_direction_and_score(setup, strategy):
    params, loss_fn, tasks = setup()
    inner = fmaml.InnerLoop(0.1, num_steps=3)
    options = dict(score_fn=loss_fn, objective="reptile")
    loss, score = fmaml.meta_loss(loss_fn, params, tasks, inner, **options)
    plain = torch.autograd.grad(loss, list(params.values()))
    loss_s, grads, score_s = fmaml.value_and_grad(
        loss_fn, params, tasks, inner, strategy=strategy, **options
    )
    chunked = list(grads.params.values())
    torch.testing.assert_close(loss_s, loss.detach())
    torch.testing.assert_close(score_s, score)
    for k, a, b in zip(params, chunked, plain, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, k=k: f"{k}: {m}")


def test_the_score_is_the_query_score_after_adapting_on_the_support():
    params, loss_fn, tasks = sinusoid_setup()
    _, score = fmaml.meta_loss(
        loss_fn,
        params,
        tasks,
        fmaml.InnerLoop(0.1, num_steps=2),
        score_fn=loss_fn,
        objective="reptile",
    )
    expected = sum(
        loss_fn(
            fmaml.adapt(
                loss_fn, params, task_at(tasks, t).support, fmaml.InnerLoop(0.1, num_steps=2)
            ),
            task_at(tasks, t).query,
        )
        for t in range(num_tasks(tasks))
    ) / num_tasks(tasks)
    torch.testing.assert_close(score, expected.detach())


def test_reptile_loss_is_pure():
    params, loss_fn, tasks = conv_setup()
    before = {k: v.detach().clone() for k, v in params.items()}
    fmaml.meta_loss(
        loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=2), objective="reptile"
    ).backward()
    for k in params:
        assert torch.equal(params[k].detach(), before[k]), k


# --- (4) adapt_keys: frozen keys get exactly zero -----------------------------------------------


@pytest.mark.parametrize("strategy", [None, fmaml.Strategy(chunk_size=1)], ids=str)
def test_frozen_keys_get_zero(strategy):
    params, loss_fn, tasks = conv_setup()
    inner = fmaml.InnerLoop(0.1, num_steps=2, adapt_keys=head_keys)
    got = direction(loss_fn, params, tasks, inner, strategy=strategy)
    for k, v in got.items():
        if head_keys(k):
            assert v.abs().max() > 0, k
        else:
            assert torch.equal(v, torch.zeros_like(v)), k
    assert_dicts_close(got, oracle_direction(loss_fn, params, tasks, 0.1, 2, head_keys))


# --- the training loop and the command line ------------------------------------------------------


def test_training_loop_puts_the_direction_in_grad():
    config = TrainConfig(
        dataset="sinusoid", algorithm="reptile", meta_batch=3, hidden=8, inner_steps=2
    )
    state = init_state(config)
    generator = torch.Generator().set_state(state.generator.get_state())
    tasks = state.problem.sample(config.meta_batch, generator)
    expected = oracle_direction(
        state.problem.loss_fn, state.params, tasks, state.config.inner_lr, 2
    )
    meta_gradient(state)
    assert_dicts_close({k: v.grad for k, v in state.params.items()}, expected)


def test_reptile_is_a_named_algorithm():
    algorithm = get_algorithm("reptile")
    assert algorithm.objective == "reptile" and algorithm.first_order
    assert algorithm.adapt_keys is None and algorithm.learned_rates is None


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


FAST = ["--val-every", "10", "--val-episodes", "4", "--checkpoint-every", "10"]


def test_cli_trains_and_tests_reptile_on_the_sinusoid(tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--dataset",
        "sinusoid",
        "--algorithm",
        "reptile",
        "--iterations",
        "20",
        "--meta-batch",
        "4",
        "--hidden",
        "8",
        "--out",
        run,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == 20
    saved = torch.load(run / "latest.pt", weights_only=False)
    assert saved["config"]["algorithm"] == "reptile"
    result = invoke("test", "--checkpoint", run, "--episodes", "10", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["iteration"] == 20 and {"1", "5", "10"} <= set(report["results"]["K=5"])


def test_reptile_trains_and_tests_on_omniglot(tmp_path, isolated_cache):
    make_omniglot(tmp_path / "omni", {f"A{i}": 3 for i in range(4)}, images_per_character=4)
    config = TrainConfig(
        dataset="omniglot",
        data_root=str(tmp_path / "omni"),
        split="alphabet:0.5,0.25,0.25",
        algorithm="reptile",
        ways=2,
        meta_batch=2,
        hidden=4,
        inner_steps=2,
        eval_inner_steps=2,
        iterations=4,
        val_every=2,
        val_episodes=4,
        checkpoint_every=2,
    )
    start = {k: v.detach().clone() for k, v in init_state(config).params.items()}
    state = train(config, tmp_path / "run")
    assert state.iteration == 4
    assert any(not torch.equal(v, start[k]) for k, v in state.params.items())
    report = evaluate_state(state, num_episodes=4)
    assert len(report["steps"]) == 3 and 0 <= report["steps"][-1]["mean"] <= 1


# --- every error message ------------------------------------------------------------------------


def test_error_learned_inner_rates():
    params, loss_fn, tasks = sinusoid_setup()
    rates = fmaml.init_rates(params, 0.1)
    with pytest.raises(ValueError, match=r"reptile_loss\(\): `inner_lr` holds a tensor that "):
        fmaml.reptile_loss(loss_fn, params, task_at(tasks, 0), fmaml.InnerLoop(rates))
    with pytest.raises(
        ValueError,
        match=r"value_and_grad\(\): `inner_lr` holds .*no term for the inner rate.*metasgd, "
        r"or --lslr",
    ):
        fmaml.value_and_grad(
            loss_fn,
            params,
            tasks,
            fmaml.InnerLoop(rates),
            objective="reptile",
            strategy=fmaml.Strategy(chunk_size=1),
        )
    # detached rates are numbers to Reptile: accepted, and the same as the plain number
    detached = {k: v.detach() for k, v in rates.items()}
    assert_dicts_close(
        direction(loss_fn, params, tasks, fmaml.InnerLoop(detached)),
        direction(loss_fn, params, tasks, fmaml.InnerLoop(0.1)),
    )


def test_error_step_weights():
    params, loss_fn, tasks = sinusoid_setup()
    with pytest.raises(
        ValueError, match=r"meta_loss\(\): the inner loop has step_weights .*Reptile"
    ):
        fmaml.meta_loss(
            loss_fn,
            params,
            tasks,
            fmaml.InnerLoop(0.1, num_steps=2, step_weights=[0.5, 0.5]),
            objective="reptile",
        )


@pytest.mark.parametrize("caller", ["task_loss", "meta_loss"])
def test_error_unknown_objective(caller):
    params, loss_fn, tasks = sinusoid_setup()
    task = task_at(tasks, 0) if caller == "task_loss" else tasks
    with pytest.raises(
        ValueError, match=rf"{caller}\(\): `objective` must be 'query' .* got 'reptle'"
    ):
        getattr(fmaml, caller)(loss_fn, params, task, fmaml.InnerLoop(0.1), objective="reptle")


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(lslr=True), "--lslr"),
        (dict(msl_epochs=3), "--msl-epochs"),
        (dict(da_epochs=3), "--da-epochs"),
        (dict(per_step_bn=True, lslr=True), "--lslr, --per-step-bn"),
    ],
)
def test_error_maml_plus_plus_settings(changes, named):
    config = TrainConfig(dataset="sinusoid", algorithm="reptile", **changes)
    with pytest.raises(ConfigError, match=rf"--algorithm reptile .* so {named} \(MAML\+\+"):
        resolve(config)


def test_error_maml_plus_plus_settings_on_the_command_line(tmp_path):
    result = invoke(
        "train", "--dataset", "sinusoid", "--algorithm", "reptile", "--lslr", "--out", tmp_path
    )
    assert result.exit_code != 0
    assert "--algorithm reptile follows params - adapted, not a query loss" in result.output


@pytest.mark.slow
def test_the_compiled_strategy_gives_the_plain_direction():
    params, loss_fn, tasks = sinusoid_setup()
    inner = fmaml.InnerLoop(0.1, num_steps=2)
    plain = direction(loss_fn, params, tasks, inner)
    compiled = direction(loss_fn, params, tasks, inner, strategy=fmaml.Strategy(compile=True))
    assert_dicts_close(compiled, plain)
