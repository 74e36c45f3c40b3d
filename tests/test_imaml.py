"""iMAML (Rajeswaran, Finn, Kakade & Levine 2019) as ``objective=fmaml.IMAML(...)``: the closed
form on quadratics, an independent autograd + conjugate-gradient oracle, a dense solve for
frozen keys, every strategy, the training loop, the CLI and every error message."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
from fmaml.implicit import conjugate_gradient
from fmaml.training.cli import main
from fmaml.training.config import TrainConfig, resolve
from fmaml.training.train import evaluate_state, init_state, meta_gradient, train

DTYPE = torch.float64
SCRIPTS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def grads(loss, params):
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def assert_dicts_close(a, b, **kwargs):
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kwargs, msg=lambda m, k=k: f"{k}: {m}")


# --- (a) the closed form on quadratics ---


def quadratic_loss(params, batch):
    """``L(w) = 1/2 (w - c)^T A (w - c)`` with ``batch = (A [d, d], c [d])``."""
    a, c = batch
    r = params["w"] - c
    return 0.5 * r @ (a @ r)


def spd(num_tasks, dim, g):
    """Symmetric positive definite ``[T, d, d]`` with eigenvalues in [0.1, 2]."""
    q, _ = torch.linalg.qr(torch.randn(num_tasks, dim, dim, generator=g, dtype=DTYPE))
    eigenvalues = 0.1 + 1.9 * torch.rand(num_tasks, dim, generator=g, dtype=DTYPE)
    return q @ torch.diag_embed(eigenvalues) @ q.transpose(1, 2)


def quadratic_tasks(num_tasks, dim, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = spd(num_tasks, dim, g), spd(num_tasks, dim, g)
    center_s = torch.randn(num_tasks, dim, generator=g, dtype=DTYPE)
    center_q = torch.randn(num_tasks, dim, generator=g, dtype=DTYPE)
    theta = torch.randn(dim, generator=g, dtype=DTYPE, requires_grad=True)
    return {"w": theta}, fmaml.Task(support=(a, center_s), query=(b, center_q))


def closed_form(params, tasks, lam):
    r"""phi*(theta) = (A + lam I)^-1 (A a + lam theta); the mean query loss there and its exact
    gradient d/dtheta L_q(phi*) = lam (A + lam I)^-1 B (phi* - c), per task, averaged."""
    a, center_s = tasks.support
    b, center_q = tasks.query
    theta = params["w"].detach()
    eye = torch.eye(theta.shape[0], dtype=DTYPE)
    shifted = a + lam * eye
    rhs = torch.einsum("tij,tj->ti", a, center_s) + lam * theta
    phi = torch.linalg.solve(shifted, rhs)
    residual = phi - center_q
    losses = 0.5 * torch.einsum("ti,tij,tj->t", residual, b, residual)
    grad = lam * torch.linalg.solve(shifted, torch.einsum("tij,tj->ti", b, residual))
    return losses.mean(), grad.mean(0)


@settings(max_examples=15, deadline=None)
@given(
    num_tasks=st.integers(1, 3),
    dim=st.integers(1, 5),
    lam=st.floats(0.3, 3.0),
    seed=st.integers(0, 2**16),
)
def test_the_implicit_gradient_is_the_exact_one_on_quadratics(num_tasks, dim, lam, seed):
    params, tasks = quadratic_tasks(num_tasks, dim, seed)
    # the inner loss has curvature in [lam + 0.1, lam + 2]: at rate 1/(lam + 2) each step
    # shrinks the distance to the minimum by 0.83 or less, 300 steps to float64 precision;
    # CG is exact after dim steps
    rate = 1.0 / (lam + 2.0)
    objective = fmaml.IMAML(lam=lam, cg_steps=dim + 2)
    loss = fmaml.meta_loss(
        quadratic_loss, params, tasks, fmaml.InnerLoop(rate, num_steps=300), objective=objective
    )
    value, expected = closed_form(params, tasks, lam)
    torch.testing.assert_close(loss.detach(), value)
    torch.testing.assert_close(grads(loss, params)["w"], expected)


def test_the_implicit_gradient_is_not_the_first_order_one():
    """Not trivially right: the query gradient at phi* itself (first-order) is different."""
    params, tasks = quadratic_tasks(2, 4, seed=3)
    lam = 0.5
    loss = fmaml.meta_loss(
        quadratic_loss,
        params,
        tasks,
        fmaml.InnerLoop(0.2, num_steps=300),
        objective=fmaml.IMAML(lam=lam, cg_steps=6),
    )
    got = grads(loss, params)["w"]
    _, exact = closed_form(params, tasks, lam)
    b, center_q = tasks.query
    a, center_s = tasks.support
    eye = torch.eye(4, dtype=DTYPE)
    phi = torch.linalg.solve(
        a + lam * eye, torch.einsum("tij,tj->ti", a, center_s) + lam * params["w"].detach()
    )
    first_order = torch.einsum("tij,tj->ti", b, phi - center_q).mean(0)
    torch.testing.assert_close(got, exact)
    assert not torch.allclose(got, first_order, atol=1e-3)


def test_few_cg_steps_approximate_and_more_converge():
    params, tasks = quadratic_tasks(1, 5, seed=7)
    _, exact = closed_form(params, tasks, 1.0)
    errors = []
    for cg_steps in (1, 2, 5):
        loss = fmaml.meta_loss(
            quadratic_loss,
            params,
            tasks,
            fmaml.InnerLoop(0.2, num_steps=300),
            objective=fmaml.IMAML(lam=1.0, cg_steps=cg_steps),
        )
        errors.append((grads(loss, params)["w"] - exact).norm().item())
    assert errors[0] > errors[1] > 1e-4 > 1e-9 > errors[2]


def test_conjugate_gradient_solves_a_dense_system():
    g = torch.Generator().manual_seed(0)
    h = spd(1, 6, g)[0]
    b = {
        "u": torch.randn(2, generator=g, dtype=DTYPE),
        "v": torch.randn(4, generator=g, dtype=DTYPE),
    }

    def hvp(u):
        flat = h @ torch.cat([u["u"], u["v"]])
        return {"u": flat[:2], "v": flat[2:]}

    lam = 0.7
    x = conjugate_gradient(hvp, b, lam, 12)  # more steps than unknowns: stays exact
    expected = torch.linalg.solve(torch.eye(6, dtype=DTYPE) + h / lam, torch.cat([b["u"], b["v"]]))
    torch.testing.assert_close(torch.cat([x["u"], x["v"]]), expected)


# --- (b) an independent oracle: autograd loops, hand-written CG, a dense solve ---


def oracle(loss_fn, params, tasks, inner_lr, num_steps, lam, cg_steps):
    """A Python loop over tasks with plain ``torch.autograd``: gradient descent on the
    regularised support loss, the query gradient, then CG on (I + H/lam) x = g with
    Hessian-vector products by double backward."""
    names = list(params)
    theta = [params[k].detach() for k in names]
    total = [torch.zeros_like(t) for t in theta]
    for t in range(num_tasks(tasks)):
        task = task_at(tasks, t)

        def support(phi, task=task):
            return loss_fn(dict(zip(names, phi, strict=True)), task.support)

        phi = [p.clone() for p in theta]
        for _ in range(num_steps):
            phi = [p.requires_grad_() for p in phi]
            reg = support(phi) + lam / 2 * sum(((p - q) ** 2).sum() for p, q in zip(phi, theta))
            step = torch.autograd.grad(reg, phi)
            phi = [(p - inner_lr * s).detach() for p, s in zip(phi, step)]
        phi = [p.requires_grad_() for p in phi]
        query = loss_fn(dict(zip(names, phi, strict=True)), task.query)
        gq = torch.autograd.grad(query, phi)
        inner = torch.autograd.grad(support(phi), phi, create_graph=True)

        def apply(v, inner=inner, phi=phi):
            hv = torch.autograd.grad(inner, phi, grad_outputs=v, retain_graph=True)
            return [a + b / lam for a, b in zip(v, hv)]

        def dot(u, v):
            return sum((a * b).sum() for a, b in zip(u, v))

        x = [torch.zeros_like(g) for g in gq]
        r = list(gq)
        d = list(gq)
        for _ in range(cg_steps):
            ad = apply(d)
            alpha = dot(r, r) / dot(d, ad)
            x = [a + alpha * b for a, b in zip(x, d)]
            r_next = [a - alpha * b for a, b in zip(r, ad)]
            beta = dot(r_next, r_next) / dot(r, r)
            d = [a + beta * b for a, b in zip(r_next, d)]
            r = r_next
        total = [a + b for a, b in zip(total, x)]
    return {k: v / num_tasks(tasks) for k, v in zip(names, total, strict=True)}


@pytest.mark.parametrize("setup", [sinusoid_setup, conv_setup])
@pytest.mark.parametrize("num_steps, lam, cg_steps", [(1, 1.0, 1), (3, 2.0, 3), (5, 0.5, 4)])
def test_matches_a_hand_written_autograd_and_cg_oracle(setup, num_steps, lam, cg_steps):
    params, loss_fn, tasks = setup()
    objective = fmaml.IMAML(lam=lam, cg_steps=cg_steps)
    loss = fmaml.meta_loss(
        loss_fn, params, tasks, fmaml.InnerLoop(0.05, num_steps=num_steps), objective=objective
    )
    expected = oracle(loss_fn, params, tasks, 0.05, num_steps, lam, cg_steps)
    got = grads(loss, params)
    assert_dicts_close(got, expected)
    assert any(v.abs().max() > 1e-3 for v in got.values())


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def dense_oracle(loss_fn, params, task, inner_lr, num_steps, lam, adapt_keys):
    """Exact implicit differentiation with dense matrices for one task, some keys frozen:
    the stationarity of grad_phi L_s + lam (phi - theta) = 0 in (theta, f) gives
    d/dtheta = (I + H_pp/lam)^-1 g_p and d/df = g_f - H_fp (I + H_pp/lam)^-1 g_p / lam."""
    fast = [k for k in params if adapt_keys(k)]
    frozen = [k for k in params if not adapt_keys(k)]
    adapted = fmaml.adapt(
        lambda p, b: (
            loss_fn(p, b) + lam / 2 * sum(((p[k] - params[k].detach()) ** 2).sum() for k in fast)
        ),
        {k: v.detach() for k, v in params.items()},
        task.support,
        fmaml.InnerLoop(inner_lr, num_steps=num_steps, adapt_keys=fast),
    )
    shapes = {k: adapted[k].shape for k in params}
    order = fast + frozen

    def unflatten(vector):
        out, i = {}, 0
        for k in order:
            n = adapted[k].numel()
            out[k] = vector[i : i + n].reshape(shapes[k])
            i += n
        return out

    point = flat([adapted[k] for k in order])
    hessian = torch.autograd.functional.hessian(
        lambda v: loss_fn(unflatten(v), task.support), point
    )
    query = torch.func.grad(lambda v: loss_fn(unflatten(v), task.query))(point)
    n = sum(adapted[k].numel() for k in fast)
    eye = torch.eye(n, dtype=DTYPE)
    x = torch.linalg.solve(eye + hessian[:n, :n] / lam, query[:n])
    frozen_grad = query[n:] - hessian[n:, :n] @ x / lam
    return {k: v for k, v in unflatten(torch.cat([x, frozen_grad])).items()}


@pytest.mark.parametrize(
    "setup",
    [sinusoid_setup, pytest.param(conv_setup, marks=pytest.mark.slow)],  # dense Hessian
)
def test_frozen_keys_get_the_exact_implicit_gradient(setup):
    params, loss_fn, tasks = setup(num_tasks=2)
    lam, inner_lr, num_steps = 1.5, 0.05, 4
    num_fast = sum(v.numel() for k, v in params.items() if head_keys(k))
    objective = fmaml.IMAML(lam=lam, cg_steps=num_fast + 5)  # CG exact on the head
    loss = fmaml.meta_loss(
        loss_fn,
        params,
        tasks,
        fmaml.InnerLoop(inner_lr, num_steps=num_steps, adapt_keys=head_keys),
        objective=objective,
    )
    got = grads(loss, params)
    per_task = [
        dense_oracle(loss_fn, params, task_at(tasks, t), inner_lr, num_steps, lam, head_keys)
        for t in range(num_tasks(tasks))
    ]
    expected = {k: sum(o[k] for o in per_task) / len(per_task) for k in params}
    assert_dicts_close(got, expected)
    body = [k for k in params if not head_keys(k)]
    assert any(got[k].abs().max() > 1e-6 for k in body)  # the body is trained too


def test_vmap_equals_a_python_loop_and_is_pure():
    params, loss_fn, tasks = conv_setup()
    before = {k: v.detach().clone() for k, v in params.items()}
    inner = fmaml.InnerLoop(0.1, num_steps=2)
    objective = fmaml.IMAML(lam=2.0, cg_steps=3)
    batched = fmaml.meta_loss(loss_fn, params, tasks, inner, objective=objective)
    looped = sum(
        fmaml.imaml_loss(loss_fn, params, task_at(tasks, t), inner, settings=objective)
        for t in range(num_tasks(tasks))
    ) / num_tasks(tasks)
    torch.testing.assert_close(batched, looped)
    assert_dicts_close(grads(batched, params), grads(looped, params))
    for k in params:
        assert torch.equal(params[k].detach(), before[k]), k


def test_imaml_string_is_the_default_settings():
    params, loss_fn, tasks = sinusoid_setup()
    inner = fmaml.InnerLoop(0.1, num_steps=2)
    a = fmaml.meta_loss(loss_fn, params, tasks, inner, objective="imaml")
    b = fmaml.meta_loss(loss_fn, params, tasks, inner, objective=fmaml.IMAML())
    assert_dicts_close(grads(a, params), grads(b, params))


def test_torch_func_grad_gives_the_same_gradient():
    params, loss_fn, tasks = sinusoid_setup()
    inner = fmaml.InnerLoop(0.1, num_steps=2)
    objective = fmaml.IMAML(lam=1.0, cg_steps=3)
    expected = grads(fmaml.meta_loss(loss_fn, params, tasks, inner, objective=objective), params)
    got = torch.func.grad(lambda p: fmaml.meta_loss(loss_fn, p, tasks, inner, objective=objective))(
        dict(params)
    )
    assert_dicts_close({k: v.detach() for k, v in got.items()}, expected)


def test_memory_does_not_keep_the_inner_steps():
    """The returned loss's graph is one node over ``params``: no inner step is kept."""
    params, loss_fn, tasks = sinusoid_setup()
    loss = fmaml.meta_loss(
        loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=20), objective=fmaml.IMAML()
    )
    seen, pending = set(), [loss.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        pending.extend(next_fn for next_fn, _ in node.next_functions)
    assert len(seen) < 4 + len(params)  # mean, the vmapped node, accumulators


@pytest.mark.slow
def test_memory_script_runs_and_imaml_keeps_no_step():
    """Each setting in its own process (tiny sizes: the numbers are in the README). The
    memory each child reads from /proc depends on the machine's load: it is reported (never
    below 0 MB), not compared; the two settings computed two different meta-gradients."""
    script = load_script("imaml_memory")
    rows = script.run(steps=(2,), num_tasks=1, num_ways=3, num_query=2, hidden=4, threads=1)
    assert [(r["algorithm"], r["num_steps"]) for r in rows] == [("maml", 2), ("imaml", 2)]
    assert all(r["peak_mb"] >= 0 and r["grad_norm"] > 0 for r in rows)
    assert rows[0]["grad_sha256"] != rows[1]["grad_sha256"]  # two algorithms, two gradients
    assert "| 2 |" in script.table(rows)


# --- (c) every strategy ---


STRATEGIES = [
    fmaml.Strategy(chunk_size=1),
    fmaml.Strategy(chunk_size=2),
    fmaml.Strategy(chunk_size=1, checkpoint=True),
    fmaml.Strategy(chunk_size=2, checkpoint=True),
    fmaml.Strategy(chunk_size=1, workers=2),
    fmaml.Strategy(chunk_size=2, workers=2),
]


@pytest.mark.parametrize("setup", [sinusoid_setup, conv_setup])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_every_strategy_gives_the_plain_value_gradient_and_score(setup, strategy):
    params, loss_fn, tasks = setup()
    inner = fmaml.InnerLoop(0.1, num_steps=3)
    options = dict(score_fn=loss_fn, objective=fmaml.IMAML(lam=2.0, cg_steps=3))
    loss, score = fmaml.meta_loss(loss_fn, params, tasks, inner, **options)
    loss_s, grads_s, score_s = fmaml.value_and_grad(
        loss_fn, params, tasks, inner, strategy=strategy, **options
    )
    torch.testing.assert_close(loss_s, loss.detach())
    torch.testing.assert_close(score_s, score)
    assert_dicts_close(grads_s.params, grads(loss, params))


@pytest.mark.parametrize("strategy", [fmaml.Strategy(chunk_size=1), fmaml.Strategy(chunk_size=2)])
def test_strategies_with_frozen_keys(strategy):
    params, loss_fn, tasks = conv_setup()
    inner = fmaml.InnerLoop(0.1, num_steps=2, adapt_keys=head_keys)
    objective = fmaml.IMAML()
    plain = grads(fmaml.meta_loss(loss_fn, params, tasks, inner, objective=objective), params)
    _, chunked = fmaml.value_and_grad(
        loss_fn, params, tasks, inner, objective=objective, strategy=strategy
    )
    assert_dicts_close(chunked.params, plain)


@pytest.mark.slow
def test_the_compiled_strategy_gives_the_plain_gradient():
    params, loss_fn, tasks = sinusoid_setup()
    inner = fmaml.InnerLoop(0.1, num_steps=2)
    objective = fmaml.IMAML(lam=1.0, cg_steps=2)
    plain = fmaml.meta_loss(loss_fn, params, tasks, inner, objective=objective)
    compiled, compiled_grads = fmaml.value_and_grad(
        loss_fn, params, tasks, inner, objective=objective, strategy=fmaml.Strategy(compile=True)
    )
    torch.testing.assert_close(compiled, plain.detach())
    assert_dicts_close(compiled_grads.params, grads(plain, params))


def test_without_grad_only_the_value():
    params, loss_fn, tasks = sinusoid_setup()
    inner = fmaml.InnerLoop(0.1, num_steps=2)
    expected = fmaml.meta_loss(loss_fn, params, tasks, inner, objective=fmaml.IMAML()).detach()
    with torch.no_grad():
        got = fmaml.meta_loss(loss_fn, params, tasks, inner, objective=fmaml.IMAML())
        assert not got.requires_grad
        torch.testing.assert_close(got, expected)
        value, _ = fmaml.value_and_grad(
            loss_fn, params, tasks, inner, objective="imaml", strategy=fmaml.Strategy(chunk_size=1)
        )
        torch.testing.assert_close(value, expected)


# --- the training loop and the command line ---


def test_imaml_is_a_named_algorithm_with_config_defaults():
    algorithm = get_algorithm("imaml")
    assert algorithm.objective == "imaml" and not algorithm.first_order
    config = resolve(TrainConfig(dataset="sinusoid", algorithm="imaml"))
    assert (config.imaml_lam, config.cg_steps) == (1.0, 5)
    assert resolve(TrainConfig(dataset="sinusoid")).imaml_lam is None


def test_training_loop_puts_the_implicit_gradient_in_grad():
    config = TrainConfig(
        dataset="sinusoid",
        algorithm="imaml",
        meta_batch=3,
        hidden=8,
        inner_steps=3,
        imaml_lam=2.0,
        cg_steps=3,
        dtype="float64",
    )
    state = init_state(config)
    generator = torch.Generator().set_state(state.generator.get_state())
    tasks = state.problem.sample(config.meta_batch, generator)
    inner_lr = state.config.inner_lr
    expected = oracle(state.problem.loss_fn, state.params, tasks, inner_lr, 3, 2.0, 3)
    meta_gradient(state)
    assert_dicts_close({k: v.grad for k, v in state.params.items()}, expected)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


FAST = ["--val-every", "2", "--val-episodes", "4", "--checkpoint-every", "2"]


def test_cli_trains_and_tests_imaml_on_the_sinusoid(tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--dataset",
        "sinusoid",
        "--algorithm",
        "imaml",
        "--imaml-lam",
        "2.0",
        "--cg-steps",
        "3",
        "--inner-steps",
        "2",
        "--iterations",
        "3",
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
    assert rows[-1]["iteration"] == 3
    saved = torch.load(run / "latest.pt", weights_only=False)
    assert saved["config"]["algorithm"] == "imaml"
    assert (saved["config"]["imaml_lam"], saved["config"]["cg_steps"]) == (2.0, 3)
    result = invoke("test", "--checkpoint", run, "--episodes", "10", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["iteration"] == 3 and {"1", "5", "10"} <= set(report["results"]["K=5"])
    # tested on the inner problem it was trained for: the proximal pull, named in the output
    assert "plus iMAML's pull 2.0/2 ||adapted - params||^2" in result.output


def test_imaml_trains_and_tests_on_omniglot(tmp_path, isolated_cache):
    make_omniglot(tmp_path / "omni", {f"A{i}": 3 for i in range(4)}, images_per_character=4)
    config = TrainConfig(
        dataset="omniglot",
        data_root=str(tmp_path / "omni"),
        split="alphabet:0.5,0.25,0.25",
        algorithm="imaml",
        ways=2,
        meta_batch=2,
        hidden=4,
        inner_steps=2,
        eval_inner_steps=2,
        iterations=4,
        val_every=2,
        val_episodes=4,
        checkpoint_every=2,
        cg_steps=2,
    )
    start = {k: v.detach().clone() for k, v in init_state(config).params.items()}
    state = train(config, tmp_path / "run")
    assert state.iteration == 4
    assert any(not torch.equal(v, start[k]) for k, v in state.params.items())
    report = evaluate_state(state, num_episodes=4)
    assert len(report["steps"]) == 3 and 0 <= report["steps"][-1]["mean"] <= 1


# --- (d) every error message ---


@pytest.mark.parametrize("lam", [0.0, -1.0, True, "1", float("nan")])
def test_error_lam(lam):
    with pytest.raises(ValueError, match=r"IMAML\(\): `lam` must be a positive number .* got"):
        fmaml.IMAML(lam=lam)


@pytest.mark.parametrize("cg_steps", [0, 2.0, True])
def test_error_cg_steps(cg_steps):
    with pytest.raises(ValueError, match=r"IMAML\(\): `cg_steps` must be a positive integer"):
        fmaml.IMAML(cg_steps=cg_steps)


def test_error_settings_type():
    params, loss_fn, tasks = sinusoid_setup()
    with pytest.raises(TypeError, match=r"imaml_loss\(\): `settings` must be an fmaml.IMAML"):
        fmaml.imaml_loss(
            loss_fn, params, task_at(tasks, 0), fmaml.InnerLoop(0.1), settings={"lam": 1}
        )


def test_error_learned_inner_rates():
    params, loss_fn, tasks = sinusoid_setup()
    rates = fmaml.init_rates(params, 0.1)
    with pytest.raises(ValueError, match=r"imaml_loss\(\): `inner_lr` holds a tensor that "):
        fmaml.imaml_loss(loss_fn, params, task_at(tasks, 0), fmaml.InnerLoop(rates))
    with pytest.raises(
        ValueError, match=r"meta_loss\(\): .*not on the rate that gets there.*metasgd"
    ):
        fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(rates), objective="imaml")
    with pytest.raises(
        ValueError, match=r"value_and_grad\(\): .*not on the rate that gets there.*metasgd"
    ):
        fmaml.value_and_grad(
            loss_fn,
            params,
            tasks,
            fmaml.InnerLoop(rates),
            objective="imaml",
            strategy=fmaml.Strategy(chunk_size=1),
        )
    detached = {k: v.detach() for k, v in rates.items()}  # constants: accepted, as the number
    assert_dicts_close(
        grads(
            fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(detached), objective="imaml"),
            params,
        ),
        grads(
            fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.1), objective="imaml"), params
        ),
    )


def test_error_step_weights():
    params, loss_fn, tasks = sinusoid_setup()
    with pytest.raises(ValueError, match=r"meta_loss\(\): `step_weights` .* Leave step_weights"):
        fmaml.meta_loss(
            loss_fn,
            params,
            tasks,
            fmaml.InnerLoop(0.1, num_steps=2, step_weights=[0.5, 0.5]),
            objective="imaml",
        )


def test_error_first_order():
    params, loss_fn, tasks = sinusoid_setup()
    with pytest.raises(ValueError, match=r"meta_loss\(\): `first_order=True` .* iMAML"):
        fmaml.meta_loss(
            loss_fn, params, tasks, fmaml.InnerLoop(0.1, first_order=True), objective="imaml"
        )


def test_error_stepwise_loss():
    params, loss_fn, tasks = conv_setup()
    bn = [k for k in params if "norm" in k or "bn" in k]
    assert bn, list(params)
    stepwise, params = fmaml.per_step(loss_fn, params, bn, 2)
    with pytest.raises(ValueError, match=r"meta_loss\(\): `loss_fn` is stepwise"):
        fmaml.meta_loss(
            stepwise, params, tasks, fmaml.InnerLoop(0.1, num_steps=2), objective="imaml"
        )


def test_error_captured_tensor():
    params, _, tasks = sinusoid_setup()
    scale = torch.tensor(2.0, dtype=DTYPE, requires_grad=True)
    model = fmaml.nn.mlp(hidden=(8, 8)).to(DTYPE)
    loss_fn = fmaml.supervised_loss(model, lambda out, y: scale * F.mse_loss(out, y))
    with pytest.raises(ValueError, match=r"meta_loss\(\): `loss_fn` uses a tensor that requires"):
        fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.1), objective="imaml")


def test_error_second_derivative():
    params, loss_fn, tasks = sinusoid_setup()
    loss = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.1), objective="imaml")
    owner = r"imaml_loss\(\): the iMAML loss"
    with pytest.raises(RuntimeError, match=owner + r".* is differentiable once"):
        first = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in first), list(params.values()))


# torch.func.jvp scripts a helper of torch's own on first use, and torch warns about that
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_error_second_derivative_with_torch_func():
    params, loss_fn, tasks = sinusoid_setup()

    def f(p):
        return fmaml.meta_loss(loss_fn, p, tasks, fmaml.InnerLoop(0.1), objective="imaml")

    message = r"imaml_loss\(\): the iMAML loss is differentiable once, in reverse mode"
    with pytest.raises(RuntimeError, match=message + r".*again \(a second derivative\)"):
        torch.func.grad(lambda p: sum(g.sum() for g in torch.func.grad(f)(p).values()))(
            dict(params)
        )
    with pytest.raises(RuntimeError, match=message + r".* in forward mode \(jvp"):
        torch.func.jvp(f, (dict(params),), ({k: torch.ones_like(v) for k, v in params.items()},))
    with pytest.raises(RuntimeError, match=message + r".* in forward mode"):
        torch.func.hessian(f)(dict(params))


@pytest.mark.parametrize("caller", ["task_loss", "meta_loss"])
def test_error_unknown_objective(caller):
    params, loss_fn, tasks = sinusoid_setup()
    task = task_at(tasks, 0) if caller == "task_loss" else tasks
    with pytest.raises(
        ValueError, match=rf"{caller}\(\): `objective` must be .* 'imaml' or fmaml.IMAML\(.*'iMAML'"
    ):
        getattr(fmaml, caller)(loss_fn, params, task, fmaml.InnerLoop(0.1), objective="iMAML")


@pytest.mark.parametrize("changes", [dict(imaml_lam=2.0), dict(cg_steps=3)])
def test_error_imaml_settings_without_imaml(changes):
    (name,) = changes
    option = f"--{name.replace('_', '-')}"
    with pytest.raises(ConfigError, match=rf"{option} set iMAML's .* --algorithm is maml"):
        resolve(TrainConfig(dataset="sinusoid", **changes))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(imaml_lam=0.0), r"--imaml-lam must be positive, got 0.0"),
        (dict(cg_steps=0), r"--cg-steps must be a positive integer, got 0"),
        (dict(lslr=True), r"--algorithm imaml differentiates no inner step .* so --lslr \(MAML"),
        (dict(msl_epochs=2, da_epochs=2), r"so --msl-epochs, --da-epochs \(MAML\+\+"),
        (dict(per_step_bn=True), r"so --per-step-bn \(MAML\+\+"),
    ],
)
def test_error_config(changes, message):
    with pytest.raises(ConfigError, match=message):
        resolve(TrainConfig(dataset="sinusoid", algorithm="imaml", **changes))


def test_error_config_on_the_command_line(tmp_path):
    result = invoke("train", "--dataset", "sinusoid", "--cg-steps", "3", "--out", tmp_path)
    assert result.exit_code != 0
    assert "--cg-steps set iMAML's inner problem" in result.output
    assert "Use --algorithm imaml" in result.output


def test_imaml_refuses_an_inner_optimizer_and_a_prototype_head():
    from fmaml.training.config import TrainConfig, resolve

    torch.manual_seed(0)
    model = fmaml.nn.mlp(in_features=2, hidden=(4,), out_features=3).double()
    loss_fn = fmaml.supervised_loss(model, torch.nn.functional.cross_entropy)
    y = torch.arange(3).repeat(2)
    task = fmaml.Task((torch.randn(6, 2).double(), y), (torch.randn(6, 2).double(), y))
    params = fmaml.params_of(model)
    with pytest.raises(ValueError, match="takes no inner_optimizer; got InnerOptimizer"):
        fmaml.task_loss(
            loss_fn,
            params,
            task,
            fmaml.InnerLoop(0.1, inner_optimizer=fmaml.inner_optim.momentum(0.5)),
            objective="imaml",
        )
    with pytest.raises(
        ValueError, match=r"task_loss\(\): the inner loop sets \['head_init'\], but iMAML"
    ):
        fmaml.task_loss(
            loss_fn, params, task, fmaml.InnerLoop(0.1, head_init="prototypes"), objective="imaml"
        )
    config = TrainConfig(algorithm="imaml", inner_optimizer="adam")
    with pytest.raises(ValueError, match="got --inner-optimizer adam. Drop --inner-optimizer"):
        resolve(config)
