"""Inner optimisers (fmaml.inner_optim): SGD, momentum and Adam in the inner loop, their
hyper-parameters meta-learned, on every strategy (float64)."""

from __future__ import annotations

import shutil

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import given, settings
from test_strategy import STRATEGIES, captured_temperature_loss
from test_strategy import build as conv_build

import fmaml
from fmaml.errors import ConfigError
from fmaml.inner_optim import InnerOptimizer, adam, get_inner_optimizer, momentum, proximal, sgd
from fmaml.training.cli import main
from fmaml.training.config import TrainConfig, resolve
from fmaml.training.train import init_state, meta_gradient

DTYPE = torch.float64


# --- a smooth model (no ReLU: no gradient is exactly 0, so the oracle may use a plain sqrt) ------


def tanh_loss(params, batch):
    """A 1-8-1 tanh network's mean squared error; a pure function of ``params``."""
    x, y = batch
    hidden = torch.tanh(x @ params["w1"].T + params["b1"])
    return F.mse_loss(hidden @ params["w2"].T + params["b2"], y)


def tanh_setup(num_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w1": torch.randn(8, 1, generator=g, dtype=DTYPE),
        "b1": 0.1 * torch.randn(8, generator=g, dtype=DTYPE),
        "w2": 0.5 * torch.randn(1, 8, generator=g, dtype=DTYPE),
        "b2": torch.zeros(1, dtype=DTYPE),
    }
    params = {k: v.requires_grad_() for k, v in params.items()}
    tasks = fmaml.tasks.SinusoidTasks(num_shots=5).sample(num_tasks, g, dtype=DTYPE)
    return params, tasks


def task_at(tasks, t):
    return fmaml.Task(*(tuple(x[t] for x in pair) for pair in tasks))


def logits(**values):
    """Leaves ``logit(value)`` that require grad, one per name."""
    return {
        k: torch.logit(torch.tensor(v, dtype=DTYPE)).requires_grad_() for k, v in values.items()
    }


# --- an independent oracle: the optimisers written out, a Python loop over tasks -----------------


def rate_at(inner_lr, step, name):
    rate = inner_lr[step] if isinstance(inner_lr, list) else inner_lr
    return rate[name] if isinstance(rate, dict) else rate


def oracle_adapt(loss_fn, params, support, inner_lr, num_steps, kind, hyper):
    """``num_steps`` of ``kind`` ("momentum" or "adam") with torch.autograd.grad
    (create_graph=True), every formula written out here."""
    fast = dict(params)
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    first = {k: torch.zeros_like(v) for k, v in params.items()}
    second = {k: torch.zeros_like(v) for k, v in params.items()}
    for step in range(num_steps):
        grads = torch.autograd.grad(loss_fn(fast, support), list(fast.values()), create_graph=True)
        new = {}
        for (k, p), g in zip(fast.items(), grads):
            lr = rate_at(inner_lr, step, k)
            if kind == "momentum":
                velocity[k] = hyper["beta"] * velocity[k] + g
                new[k] = p - lr * velocity[k]
            else:
                b1, b2, eps, t = hyper["beta1"], hyper["beta2"], hyper["eps"], step + 1
                first[k] = b1 * first[k] + (1 - b1) * g
                second[k] = b2 * second[k] + (1 - b2) * g**2
                m_hat, v_hat = first[k] / (1 - b1**t), second[k] / (1 - b2**t)
                new[k] = p - lr * m_hat / (torch.sqrt(v_hat) + eps)
        fast = new
    return fast


def oracle_meta_loss(loss_fn, params, tasks, inner_lr, num_steps, kind, hyper):
    num = tasks.support[0].shape[0]
    total = 0
    for t in range(num):
        task = task_at(tasks, t)
        adapted = oracle_adapt(loss_fn, params, task.support, inner_lr, num_steps, kind, hyper)
        total = total + loss_fn(adapted, task.query)
    return total / num


def make(kind, hyper):
    return momentum(**hyper) if kind == "momentum" else adam(**hyper)


def learned_hyper(kind, raw):
    """The optimiser's hyper-parameters from learned logits (``raw``): sigmoid(logit)."""
    hyper = {k: torch.sigmoid(v) for k, v in raw.items()}
    if kind == "adam":
        hyper["eps"] = 1e-3
    return hyper


RAW = {"momentum": dict(beta=0.7), "adam": dict(beta1=0.6, beta2=0.9)}


@pytest.mark.parametrize("rates", ["number", "metasgd", "lslr"])
@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_meta_gradient_matches_a_hand_written_autograd_loop(kind, rates):
    """Loss and meta-gradient for params, learned rates and learned betas: the vmapped
    functional code equals the loop above (second order, 3 steps)."""
    params, tasks = tanh_setup()
    num_steps = 3
    if rates == "number":
        inner_lr = 0.05
    elif rates == "metasgd":
        inner_lr = fmaml.init_rates(params, 0.05)
    else:
        inner_lr = fmaml.init_rates(params, 0.05, per_element=False, num_steps=num_steps)
    raw = logits(**RAW[kind])
    rate_leaves = [
        v
        for r in (inner_lr if isinstance(inner_lr, list) else [inner_lr])
        if isinstance(r, dict)
        for v in r.values()
    ]
    leaves = [*params.values(), *rate_leaves, *raw.values()]
    loss = fmaml.meta_loss(
        tanh_loss,
        params,
        tasks,
        fmaml.InnerLoop(
            inner_lr, num_steps=num_steps, inner_optimizer=make(kind, learned_hyper(kind, raw))
        ),
    )
    expected_loss = oracle_meta_loss(
        tanh_loss, params, tasks, inner_lr, num_steps, kind, learned_hyper(kind, raw)
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss, leaves)
    expected = torch.autograd.grad(expected_loss, leaves)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert all(g.abs() > 1e-6 for g in got[-len(raw) :])  # the betas matter


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_adapted_parameters_match_torch_optim(kind):
    """Without a graph: the inner loop's iterates are torch.optim.SGD(momentum=...) /
    torch.optim.Adam's on the same support loss, step by step."""
    params, tasks = tanh_setup()
    support = task_at(tasks, 0).support
    hyper = dict(beta=0.8) if kind == "momentum" else dict(beta1=0.7, beta2=0.95, eps=1e-6)
    trajectory = fmaml.unroll(
        tanh_loss,
        params,
        support,
        fmaml.InnerLoop(0.1, num_steps=4, inner_optimizer=make(kind, hyper)),
    )
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    if kind == "momentum":
        opt = torch.optim.SGD(leaves.values(), lr=0.1, momentum=0.8)
    else:
        opt = torch.optim.Adam(leaves.values(), lr=0.1, betas=(0.7, 0.95), eps=1e-6)
    for step in range(1, 5):
        opt.zero_grad()
        tanh_loss(leaves, support).backward()
        opt.step()
        for k in params:
            torch.testing.assert_close(trajectory[step][k], leaves[k], rtol=1e-12, atol=1e-14)


# --- reductions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rates", ["number", "metasgd", "lslr"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum-0"])
def test_sgd_and_momentum_zero_are_todays_inner_loop_exactly(optimizer, rates):
    """sgd() and momentum(beta=0) give the same numbers as inner_optimizer=None (today's
    inner step), iterates and meta-gradients, Meta-SGD and LSLR rates included."""
    loss_fn, params, tasks, _ = conv_build("maml")
    num_steps = 2
    if rates == "number":
        inner_lr = 0.1
    elif rates == "metasgd":
        inner_lr = fmaml.init_rates(params, 0.1)
    else:
        inner_lr = fmaml.init_rates(params, 0.1, per_element=False, num_steps=num_steps)
    chosen = sgd() if optimizer == "sgd" else momentum(0.0)
    support = task_at(tasks, 0).support
    inner = fmaml.InnerLoop(inner_lr, num_steps=num_steps)
    for a, b in zip(
        fmaml.unroll(loss_fn, params, support, inner),
        fmaml.unroll(loss_fn, params, support, inner.replace(inner_optimizer=chosen)),
        strict=True,
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)
    leaves = list(params.values())
    if rates != "number":
        leaves += [v for r in (inner_lr if rates == "lslr" else [inner_lr]) for v in r.values()]
    today = fmaml.meta_loss(loss_fn, params, tasks, inner)
    other = fmaml.meta_loss(loss_fn, params, tasks, inner.replace(inner_optimizer=chosen))
    assert torch.equal(today, other)
    for a, b in zip(
        torch.autograd.grad(today, leaves), torch.autograd.grad(other, leaves), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_metasgd_is_the_per_element_rate_case_of_every_optimizer():
    """Per-element rates with momentum: each element moves by its own rate times its velocity
    (a rate dict of ones is the same as the number 1)."""
    params, tasks = tanh_setup()
    support = task_at(tasks, 0).support
    ones = {k: torch.ones_like(v) for k, v in params.items()}
    for opt in [momentum(0.5), adam(0.5, 0.9)]:
        a = fmaml.adapt(
            tanh_loss, params, support, fmaml.InnerLoop(ones, num_steps=2, inner_optimizer=opt)
        )
        b = fmaml.adapt(
            tanh_loss, params, support, fmaml.InnerLoop(1.0, num_steps=2, inner_optimizer=opt)
        )
        assert all(torch.equal(a[k], b[k]) for k in a)


# --- closed forms on a quadratic -----------------------------------------------------------------


def quadratic(params, batch):
    return 0.5 * ((params["w"] - batch[0]) ** 2).sum()


@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(1, 6),
    rate=st.floats(1e-3, 1.0),
    eps=st.sampled_from([1e-8, 1e-3, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_adams_first_step_is_rate_times_g_over_abs_g_plus_eps(dim, rate, eps, seed):
    """Adam's first step: m_hat = g, v_hat = g^2, so w_1 = w - rate * g / (|g| + eps)
    whatever the betas (about rate * sign(g))."""
    g = torch.Generator().manual_seed(seed)
    w, c = torch.randn(dim, generator=g, dtype=DTYPE), torch.randn(dim, generator=g, dtype=DTYPE)
    for betas in [(0.9, 0.999), (0.0, 0.5)]:
        opt = adam(*betas, eps=eps)
        adapted = fmaml.adapt(
            quadratic, {"w": w}, (c, None), fmaml.InnerLoop(rate, inner_optimizer=opt)
        )
        grad = w - c
        torch.testing.assert_close(
            adapted["w"], w - rate * grad / (grad.abs() + eps), rtol=1e-12, atol=1e-14
        )


@settings(max_examples=20, deadline=None)
@given(
    steps=st.integers(1, 6),
    rate=st.floats(0.01, 0.5),
    beta=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**16),
)
def test_momentum_on_a_quadratic_is_the_heavy_ball_recursion(steps, rate, beta, seed):
    """On L = 1/2 |w - c|^2 the gradient is w - c, so the iterates follow the two-term
    recursion d_{s+1} = (1 + beta - rate) d_s - beta d_{s-1} (d = w - c, d_{-1} = d_0)."""
    g = torch.Generator().manual_seed(seed)
    w, c = torch.randn(3, generator=g, dtype=DTYPE), torch.randn(3, generator=g, dtype=DTYPE)
    trajectory = fmaml.unroll(
        quadratic,
        {"w": w},
        (c, None),
        fmaml.InnerLoop(rate, num_steps=steps, inner_optimizer=momentum(beta)),
    )
    before, d = w - c, w - c
    for s in range(1, steps + 1):
        before, d = d, (1 + beta - rate) * d - beta * before
        torch.testing.assert_close(trajectory[s]["w"] - c, d, rtol=1e-10, atol=1e-12)


# --- meta-gradients for the betas against finite differences -------------------------------------


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_meta_gradient_for_learned_betas_matches_finite_differences(kind):
    """Second order (first order drops terms on purpose, so it is not the derivative)."""
    params, tasks = tanh_setup()
    raw = logits(**RAW[kind])

    def value(values):
        hyper = learned_hyper(kind, dict(zip(raw, values, strict=True)))
        return fmaml.meta_loss(
            tanh_loss,
            params,
            tasks,
            fmaml.InnerLoop(0.05, num_steps=3, inner_optimizer=make(kind, hyper)),
        )

    got = torch.autograd.grad(value(list(raw.values())), list(raw.values()))
    h = 1e-6
    for i in range(len(raw)):
        plus = [v.detach() + (h if j == i else 0) for j, v in enumerate(raw.values())]
        minus = [v.detach() - (h if j == i else 0) for j, v in enumerate(raw.values())]
        estimate = (value(plus) - value(minus)).detach() / (2 * h)
        assert got[i].abs() > 1e-5
        torch.testing.assert_close(got[i], estimate, rtol=1e-6, atol=1e-9)


def test_adam_meta_gradient_is_finite_where_a_gradient_is_exactly_zero():
    """An element the support loss does not touch: its Adam second moment stays 0, where
    sqrt's derivative is infinite; the meta-gradient is the finite one (finite differences)."""
    w = torch.tensor([0.3, -0.2, 0.5], dtype=DTYPE, requires_grad=True)
    target = torch.tensor([1.0, 2.0], dtype=DTYPE)

    def support_loss(params, batch):
        return 0.5 * ((params["w"][:2] - batch[0]) ** 2).sum() + (params["w"][:2] ** 3).sum()

    def meta(w):
        adapted = fmaml.adapt(
            support_loss,
            {"w": w},
            (target, None),
            fmaml.InnerLoop(0.1, num_steps=2, inner_optimizer=adam(0.5, 0.9, eps=1e-3)),
        )
        return (adapted["w"] ** 2 * torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE)).sum()

    (got,) = torch.autograd.grad(meta(w), w)
    assert torch.isfinite(got).all()
    h = 1e-6
    for i in range(3):
        step = torch.zeros(3, dtype=DTYPE)
        step[i] = h
        estimate = (meta(w.detach() + step) - meta(w.detach() - step)) / (2 * h)
        torch.testing.assert_close(got[i], estimate, rtol=1e-6, atol=1e-9)


# --- every strategy ------------------------------------------------------------------------------


def conv_case(kind, rates):
    loss_fn, params, tasks, inner = conv_build("metasgd" if rates == "metasgd" else "maml")
    raw = logits(**RAW[kind])
    return loss_fn, params, tasks, inner.replace(num_steps=2), raw


@pytest.mark.parametrize("rates", ["number", "metasgd"])
@pytest.mark.parametrize("kind", ["momentum", "adam"])
@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
def test_every_strategy_gives_the_same_loss_and_meta_gradient(strategy_name, kind, rates):
    """conv4 with BatchNorm, 2 steps, learned betas (and Meta-SGD rates): each strategy
    equals the definition, the betas' gradients included (through `wrt`)."""
    loss_fn, params, tasks, inner, raw = conv_case(kind, rates)
    rate_leaves = list(inner.inner_lr.values()) if rates == "metasgd" else []
    leaves = [*params.values(), *rate_leaves, *raw.values()]

    def loop():
        return inner.replace(inner_optimizer=make(kind, learned_hyper(kind, raw)))

    reference = fmaml.meta_loss(loss_fn, params, tasks, loop())
    expected = torch.autograd.grad(reference, leaves)
    loss, grads = fmaml.value_and_grad(
        loss_fn, params, tasks, loop(), wrt=leaves, strategy=STRATEGIES[strategy_name]
    )
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)
    for i, (a, b) in enumerate(zip(grads.wrt, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, i=i: f"{i}: {m}")
    assert all(g.abs() > 1e-8 for g in expected[-len(raw) :])


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
def test_sgd_on_every_strategy_is_todays_meta_gradient(strategy_name):
    """sgd() (no state, no hyper-parameters) through each path, Meta-SGD rates, 2 steps."""
    loss_fn, params, tasks, inner = conv_build("metasgd")
    inner = inner.replace(num_steps=2)
    leaves = [*params.values(), *inner.inner_lr.values()]
    reference = fmaml.meta_loss(loss_fn, params, tasks, inner)
    expected = torch.autograd.grad(reference, leaves)
    loss, grads = fmaml.value_and_grad(
        loss_fn,
        params,
        tasks,
        inner.replace(inner_optimizer=sgd()),
        wrt=leaves,
        strategy=STRATEGIES[strategy_name],
    )
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads.wrt, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "strategy_name", ["one-at-a-time", "checkpoint", "one-at-a-time-checkpoint-workers"]
)
def test_strategies_with_fixed_hyper_parameters_and_first_order(strategy_name):
    """Number hyper-parameters, first order, 3 steps, step weights: the same on each path."""
    loss_fn, params, tasks, inner = conv_build("maml")
    inner = inner.replace(num_steps=3, first_order=True, step_weights=[0.2, 0.3, 0.5])
    for opt in [momentum(0.5), adam(0.8, 0.9, 1e-4)]:
        reference = fmaml.meta_loss(loss_fn, params, tasks, inner.replace(inner_optimizer=opt))
        expected = torch.autograd.grad(reference, list(params.values()))
        loss, grads = fmaml.value_and_grad(
            loss_fn,
            params,
            tasks,
            inner.replace(inner_optimizer=opt),
            strategy=STRATEGIES[strategy_name],
        )
        torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)
        for a, b in zip(grads.params.values(), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("strategy_name", ["one-at-a-time", "chunks-of-2", "checkpoint"])
def test_a_tensor_the_loss_captures_keeps_its_exact_gradient(strategy_name):
    """A captured temperature (leaf and non-leaf) with Adam and a learned beta: the same
    gradient for the temperature and the beta as the definition."""
    _, params, tasks, inner = conv_build("maml")
    inner = inner.replace(num_steps=2)
    log_temp = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    raw = logits(**RAW["adam"])
    leaves = [log_temp, *raw.values(), *params.values()]
    for kind in ["leaf", "non-leaf"]:
        grads = []
        for strategy in [None, STRATEGIES[strategy_name]]:
            loss_fn = captured_temperature_loss(kind, log_temp)
            loop = inner.replace(inner_optimizer=adam(**learned_hyper("adam", raw)))
            if strategy is None:  # the definition
                loss = fmaml.meta_loss(loss_fn, params, tasks, loop)
                grads.append(torch.autograd.grad(loss, leaves))
            else:
                _, got = fmaml.value_and_grad(
                    loss_fn, params, tasks, loop, wrt=leaves, strategy=strategy
                )
                grads.append(got.wrt)
        assert grads[0][0].abs() > 1e-3
        for a, b in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_a_beta_computed_from_a_captured_tensor():
    """beta = sigmoid(log_temp) while the loss captures log_temp: with ``wrt=[log_temp]``
    log_temp gets its one total gradient on every path; naming beta in ``wrt`` too would
    count it twice, and is refused."""
    _, params, tasks, inner = conv_build("maml")
    inner = inner.replace(num_steps=2)
    log_temp = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    loss_fn = captured_temperature_loss("leaf", log_temp)

    def loop():  # beta anew for each call: its graph is freed by the gradient taken through it
        return inner.replace(inner_optimizer=momentum(torch.sigmoid(log_temp)))

    expected = torch.autograd.grad(fmaml.meta_loss(loss_fn, params, tasks, loop()), [log_temp])
    for strategy in [ONE_AT_A_TIME, STRATEGIES["checkpoint"]]:
        _, grads = fmaml.value_and_grad(
            loss_fn, params, tasks, loop(), wrt=[log_temp], strategy=strategy
        )
        torch.testing.assert_close(grads.wrt[0], expected[0], rtol=1e-9, atol=1e-11)
    beta = torch.sigmoid(log_temp)
    with pytest.raises(
        ValueError,
        match=r"value_and_grad\(\): a tensor of `wrt` \(shape \[\], torch.float64\) is computed "
        r"from a tensor of `wrt` .*counted twice",
    ):
        fmaml.value_and_grad(
            loss_fn,
            params,
            tasks,
            inner.replace(inner_optimizer=momentum(beta)),
            wrt=[log_temp, beta],
            strategy=ONE_AT_A_TIME,
        )


ONE_AT_A_TIME = fmaml.Strategy(chunk_size=1)


@pytest.mark.skipif(
    shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler (c++)"
)
@pytest.mark.slow
def test_the_compiled_strategy_gives_the_same_gradients_for_learned_betas():
    """Adam with learned betas on the tanh network, compiled once, called with new
    sigmoid(logit) tensors twice (the compiled step is reused: hyper comes in as an argument)."""
    params, tasks = tanh_setup()
    raw = logits(**RAW["adam"])
    leaves = [*params.values(), *raw.values()]
    results = []
    for strategy in [None, fmaml.Strategy(compile=True), fmaml.Strategy(compile=True)]:
        opt = adam(**learned_hyper("adam", raw))
        inner = fmaml.InnerLoop(0.05, num_steps=2, inner_optimizer=opt)
        if strategy is None:  # the definition
            loss = fmaml.meta_loss(tanh_loss, params, tasks, inner)
            results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
        else:
            loss, grads = fmaml.value_and_grad(
                tanh_loss, params, tasks, inner, wrt=leaves, strategy=strategy
            )
            results.append((loss, grads.wrt))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# --- purity, evaluation, Reptile -----------------------------------------------------------------


def test_update_is_pure():
    params, _ = tanh_setup()
    for opt in [sgd(), momentum(0.9), adam()]:
        state = opt.init(params)
        grads = {k: torch.ones_like(v) for k, v in params.items()}
        before = {k: v.clone() for k, v in params.items()}
        state_before = str(state)
        adapted, _ = opt.update(grads, state, params, dict.fromkeys(params, 0.1), opt.hyper)
        assert all(torch.equal(params[k], before[k]) for k in params)
        assert str(state) == state_before
        assert adapted is not params
        assert all(not torch.equal(adapted[k], params[k]) for k in params)


def test_evaluate_adapts_with_the_inner_optimizer():
    params, tasks = tanh_setup()
    opt = adam(torch.tensor(0.5, dtype=DTYPE, requires_grad=True), 0.9)
    scores = fmaml.evaluate(
        tanh_loss,
        tanh_loss,
        params,
        [tasks],
        fmaml.InnerLoop(0.05, num_steps=2, inner_optimizer=opt),
    )
    for t in range(3):
        task = task_at(tasks, t)
        adapted = fmaml.adapt(
            tanh_loss, params, task.support, fmaml.InnerLoop(0.05, num_steps=2, inner_optimizer=opt)
        )
        torch.testing.assert_close(scores[t, 2], tanh_loss(adapted, task.query).detach())
    assert not scores.requires_grad


def test_reptile_with_adam_in_the_inner_loop():
    """The paper's few-shot setting (Adam, beta1=0 inside): the gradient is params - adapted,
    adapted by the same Adam steps."""
    params, tasks = tanh_setup()
    opt = adam(beta1=0.0, beta2=0.99)
    loss = fmaml.meta_loss(
        tanh_loss,
        params,
        tasks,
        fmaml.InnerLoop(0.05, num_steps=3, inner_optimizer=opt),
        objective="reptile",
    )
    got = torch.autograd.grad(loss, list(params.values()))
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(3):
        adapted = fmaml.adapt(
            tanh_loss,
            params,
            task_at(tasks, t).support,
            fmaml.InnerLoop(0.05, num_steps=3, inner_optimizer=opt),
        )
        for k in params:
            total[k] += (params[k] - adapted[k]).detach() / 3
    for a, k in zip(got, params, strict=True):
        torch.testing.assert_close(a, total[k], rtol=1e-12, atol=1e-14)


# --- training: config, checkpoints, resume, the command line -------------------------------------


def sinusoid_config(**changes):
    values = dict(
        dataset="sinusoid",
        meta_batch=4,
        hidden=8,
        iterations=4,
        val_every=100,
        val_episodes=4,
        checkpoint_every=2,
        dtype="float64",
        inner_steps=2,
    )
    return TrainConfig(**{**values, **changes})


def test_training_learns_the_betas_and_puts_their_gradient_in_grad():
    state = init_state(sinusoid_config(inner_optimizer="adam", learn_inner_hyper=True))
    assert sorted(state.hyper_logits) == ["beta1", "beta2"]
    torch.testing.assert_close(
        torch.sigmoid(state.hyper_logits["beta2"]), torch.tensor(0.999, dtype=DTYPE)
    )
    generator_state = state.generator.get_state()
    meta_gradient(state)
    # the oracle: the same meta-batch through meta_loss with the state's optimiser
    state.generator.set_state(generator_state)
    tasks = state.problem.sample(state.config.meta_batch, state.generator)
    loss = fmaml.meta_loss(
        state.problem.loss_fn,
        state.params,
        tasks,
        fmaml.InnerLoop(state.inner_lr, num_steps=2, inner_optimizer=state.inner_optimizer),
    )
    expected = torch.autograd.grad(loss, list(state.hyper_logits.values()))
    for leaf, b in zip(state.hyper_logits.values(), expected, strict=True):
        torch.testing.assert_close(leaf.grad, b, rtol=1e-9, atol=1e-12)
    assert state.leaves()[-2:] == list(state.hyper_logits.values())


def test_sgd_runs_are_todays_runs():
    """--inner-optimizer sgd (the default) trains exactly as before: no optimiser is built."""
    state = init_state(sinusoid_config())
    assert state.inner_optimizer is None and state.hyper_logits is None


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


FAST = [
    "--dataset",
    "sinusoid",
    "--meta-batch",
    "4",
    "--hidden",
    "8",
    "--val-every",
    "100",
    "--val-episodes",
    "4",
    "--checkpoint-every",
    "2",
    "--dtype",
    "float64",
]


def test_cli_trains_resumes_and_tests_with_learned_momentum(tmp_path):
    """3 iterations with a learned momentum; the checkpoint holds the logit; a run resumed
    at iteration 2 ends where the uninterrupted one does, the logit included; `test` adapts
    with the learned momentum."""
    args = [
        *FAST,
        "--inner-optimizer",
        "momentum",
        "--inner-hyper",
        "beta=0.5",
        "--learn-inner-hyper",
        "--inner-steps",
        "2",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert invoke("train", *args, "--iterations", "4", "--out", whole).exit_code == 0
    result = invoke("train", *args, "--iterations", "2", "--out", split)
    assert result.exit_code == 0, result.output
    result = invoke("train", "--resume", split, "--iterations", "4")
    assert result.exit_code == 0, result.output
    a = torch.load(whole / "latest.pt", weights_only=True)
    b = torch.load(split / "latest.pt", weights_only=True)
    assert a["config"]["inner_optimizer"] == "momentum" and a["config"]["learn_inner_hyper"]
    assert list(a["hyper_logits"]) == ["beta"]
    assert a["hyper_logits"]["beta"] != 0.0  # logit(0.5) = 0 at the start: it was trained
    assert torch.equal(a["hyper_logits"]["beta"], b["hyper_logits"]["beta"])
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    restored = fmaml.restore_state(whole / "latest.pt")
    assert torch.equal(restored.hyper_logits["beta"], a["hyper_logits"]["beta"])
    result = invoke("test", "--checkpoint", whole, "--episodes", "4", "--inner-steps", "2")
    assert result.exit_code == 0, result.output
    assert "inner momentum (beta=0.5, betas learned)" in result.output


def test_a_checkpoint_without_its_learned_betas_is_refused(tmp_path):
    state = init_state(sinusoid_config(inner_optimizer="momentum", learn_inner_hyper=True))
    from fmaml.training.checkpoint import CheckpointError, save_checkpoint
    from fmaml.training.train import state_dict

    contents = state_dict(state)
    contents["hyper_logits"] = None
    save_checkpoint(tmp_path / "latest.pt", contents)
    with pytest.raises(
        CheckpointError, match=r"learns the inner optimiser's \['beta'\].*holds none"
    ):
        fmaml.restore_state(tmp_path / "latest.pt")


# --- every error message -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_it, error, match",
    [
        (
            lambda: momentum(1.0),
            ValueError,
            r"momentum\(\): `beta` must be in \[0, 1\), got 1.0. .*sigmoid",
        ),
        (lambda: momentum(-0.1), ValueError, r"`beta` must be in \[0, 1\), got -0.1"),
        (lambda: adam(beta1=1), ValueError, r"adam\(\): `beta1` must be in \[0, 1\), got 1"),
        (lambda: adam(beta2=1.5), ValueError, r"adam\(\): `beta2` must be in \[0, 1\), got 1.5"),
        (lambda: adam(eps=0.0), ValueError, r"adam\(\): `eps` must be positive, got 0.0"),
        (lambda: momentum(True), TypeError, r"`beta` must be a number or a 0-d tensor, got bool"),
        (lambda: momentum("0.9"), TypeError, r"`beta` must be a number or a 0-d tensor, got str"),
        (
            lambda: momentum(torch.ones(2)),
            ValueError,
            r"0-d floating-point tensor, got a tensor of shape \[2\]",
        ),
        (
            lambda: get_inner_optimizer("rmsprop"),
            ValueError,
            r"unknown inner optimiser 'rmsprop'; expected one of \['adam', 'momentum', 'sgd'\]",
        ),
        (
            lambda: get_inner_optimizer("momentum", beta1=0.5),
            ValueError,
            r"momentum has no hyper-parameter 'beta1'; it takes \['beta'\]",
        ),
        (
            lambda: get_inner_optimizer("sgd", beta=0.5),
            ValueError,
            r"sgd has no hyper-parameter 'beta'; it takes none",
        ),
    ],
)
def test_error_building_an_optimizer(make_it, error, match):
    with pytest.raises(error, match=match):
        make_it()


def test_error_a_name_or_a_bad_value_as_inner_optimizer():
    params, tasks = tanh_setup()
    with pytest.raises(
        TypeError,
        match=r"meta_loss\(\): `inner_optimizer` must be an fmaml.inner_optim.InnerOptimizer .* "
        r"got str. Build it: fmaml.inner_optim.get_inner_optimizer\('adam'\)",
    ):
        fmaml.meta_loss(tanh_loss, params, tasks, fmaml.InnerLoop(0.1, inner_optimizer="adam"))
    with pytest.raises(TypeError, match=r"value_and_grad\(\): `inner_optimizer` must be"):
        fmaml.value_and_grad(
            tanh_loss,
            params,
            tasks,
            fmaml.InnerLoop(0.1, inner_optimizer="adam"),
            strategy=ONE_AT_A_TIME,
        )
    bad = momentum()._replace(hyper={"beta": torch.ones(3, dtype=DTYPE)})
    with pytest.raises(ValueError, match=r"adapt\(\): the hyper-parameter `beta` must be"):
        fmaml.adapt(
            tanh_loss, params, task_at(tasks, 0).support, fmaml.InnerLoop(0.1, inner_optimizer=bad)
        )
    assert isinstance(bad, InnerOptimizer)


def counting_sgd() -> InnerOptimizer:
    """A user's optimiser whose state holds a Python int: SGD whose steps shrink as 1/t."""

    def init(params):
        return {"count": 0}

    def update(grads, state, params, rate, hyper):
        t = state["count"] + 1
        return {k: params[k] - rate[k] * grads[k] / t for k in params}, {"count": t}

    return InnerOptimizer(init, update, {})


def test_a_users_optimizer_runs_and_a_state_of_numbers_is_refused_when_recomputed():
    """Any InnerOptimizer runs on the plain paths; the recomputing strategy vmaps the state
    between steps, so it names the Python number it can't carry and the two fixes."""
    loss_fn, params, tasks, inner = conv_build("maml")
    inner = inner.replace(num_steps=2, inner_optimizer=counting_sgd())
    reference = fmaml.meta_loss(loss_fn, params, tasks, inner)
    loss, _ = fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=ONE_AT_A_TIME)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(
        ValueError,
        match=r"value_and_grad\(\): Strategy\(checkpoint=True\) keeps the inner optimiser's "
        r"state .* holds \['int'\]\. Keep a step counter as a 0-d tensor .* or use "
        r"checkpoint=False",
    ):
        fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=STRATEGIES["checkpoint"])


def test_error_reptile_with_learned_hyper_parameters():
    params, tasks = tanh_setup()
    opt = momentum(torch.tensor(0.5, dtype=DTYPE, requires_grad=True))
    with pytest.raises(
        ValueError,
        match=r"meta_loss\(\): the inner optimiser's 'beta' requires grad.*never "
        r"be trained",
    ):
        fmaml.meta_loss(
            tanh_loss, params, tasks, fmaml.InnerLoop(0.1, inner_optimizer=opt), objective="reptile"
        )


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            dict(inner_optimizer="rmsprop"),
            r"--inner-optimizer must be one of \['adam', 'momentum', 'sgd'\], got 'rmsprop'",
        ),
        (
            dict(inner_optimizer="momentum", inner_hyper={"beta": 1.5}),
            r"--inner-hyper: momentum\(\): `beta` must be in \[0, 1\)",
        ),
        (
            dict(inner_optimizer="adam", inner_hyper={"beta": 0.5}),
            r"--inner-hyper: .*adam has no hyper-parameter 'beta'",
        ),
        (
            dict(learn_inner_hyper=True),
            r"--learn-inner-hyper learns .* --inner-optimizer sgd has none",
        ),
        (
            dict(algorithm="reptile", inner_optimizer="adam", learn_inner_hyper=True),
            r"--learn-inner-hyper with --algorithm reptile",
        ),
        (
            dict(inner_optimizer="momentum", inner_hyper={"beta": 0.0}, learn_inner_hyper=True),
            r"learns beta as sigmoid\(logit\).*--inner-hyper beta=0.5 \(got 0.0\)",
        ),
    ],
)
def test_error_training_settings(changes, match):
    with pytest.raises(ConfigError, match=match):
        resolve(sinusoid_config(**changes))


def test_error_on_the_command_line(tmp_path):
    result = invoke("train", *FAST, "--inner-hyper", "beta", "--out", tmp_path / "a")
    assert result.exit_code != 0
    assert "expected NAME=VALUE with a number, e.g. beta=0.5; got 'beta'" in result.output
    result = invoke("train", *FAST, "--inner-optimizer", "rmsprop", "--out", tmp_path / "b")
    assert result.exit_code != 0 and "'rmsprop' is not one of" in result.output
    result = invoke("train", *FAST, "--learn-inner-hyper", "--out", tmp_path / "c")
    assert result.exit_code != 0 and "--inner-optimizer sgd has none" in result.output


# --- proximal: iMAML's inner problem as an inner optimiser ---------------------------------------


def pulled_loss(loss_fn, anchor, lam):
    """The support loss plus lam/2 ||p - anchor||^2, written out (the oracle's loss)."""

    def loss(p, batch):
        return loss_fn(p, batch) + 0.5 * lam * sum(((p[k] - anchor[k]) ** 2).sum() for k in p)

    return loss


@pytest.mark.parametrize("base", ["sgd", "momentum"])
def test_proximal_is_descent_on_the_pulled_loss_and_its_meta_gradient_too(base):
    """proximal(lam, base) = base on L + lam/2 ||phi - params||^2: iterates, and the
    second-order meta-gradient (through the anchor, which is params) against the oracle."""
    params, tasks = tanh_setup()
    lam, num_steps = 0.7, 3
    base_opt = None if base == "sgd" else momentum(0.5)
    opt = proximal(lam, base_opt)
    loss = fmaml.meta_loss(
        tanh_loss, params, tasks, fmaml.InnerLoop(0.05, num_steps=num_steps, inner_optimizer=opt)
    )
    total = 0
    for t in range(tasks.support[0].shape[0]):
        task = task_at(tasks, t)
        fast = dict(params)
        velocity = {k: torch.zeros_like(v) for k, v in params.items()}
        for _ in range(num_steps):
            step_loss = pulled_loss(tanh_loss, params, lam)(fast, task.support)
            grads = torch.autograd.grad(step_loss, list(fast.values()), create_graph=True)
            for (k, p), g in zip(list(fast.items()), grads, strict=True):
                velocity[k] = (0.5 * velocity[k] if base == "momentum" else 0) + g
                fast[k] = p - 0.05 * velocity[k]
        total = total + tanh_loss(fast, task.query)
    expected = total / tasks.support[0].shape[0]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss, list(params.values()))
    want = torch.autograd.grad(expected, list(params.values()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    plain = fmaml.meta_loss(tanh_loss, params, tasks, fmaml.InnerLoop(0.05, num_steps=num_steps))
    assert not torch.allclose(loss, plain)  # the pull changes the result


def test_proximal_with_lam_zero_is_its_base_exactly():
    params, tasks = tanh_setup()
    inner = fmaml.InnerLoop(0.05, num_steps=2)
    for base in [None, adam(0.5, 0.9, 1e-3)]:
        a = fmaml.meta_loss(tanh_loss, params, tasks, inner.replace(inner_optimizer=base or sgd()))
        b = fmaml.meta_loss(
            tanh_loss, params, tasks, inner.replace(inner_optimizer=proximal(0.0, base))
        )
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
def test_proximal_gives_the_same_meta_gradient_on_every_strategy(strategy_name):
    """conv4, 2 steps, a learned lam: each strategy equals the definition, lam's gradient
    included (none goes missing)."""
    loss_fn, params, tasks, inner = conv_build("maml")
    lam = torch.tensor(0.5, dtype=DTYPE, requires_grad=True)
    leaves = [*params.values(), lam]
    inner = inner.replace(num_steps=2, inner_optimizer=proximal(lam))
    reference = fmaml.meta_loss(loss_fn, params, tasks, inner)
    want = torch.autograd.grad(reference, leaves)
    loss, grads = fmaml.value_and_grad(
        loss_fn, params, tasks, inner, wrt=leaves, strategy=STRATEGIES[strategy_name]
    )
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-10, atol=1e-12)
    got = grads.wrt
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert got[-1].abs() > 1e-8  # lam matters


def test_proximal_refuses_bad_arguments_saying_what_it_expects():
    with pytest.raises(ValueError, match=r"`lam` must be >= 0, got -1"):
        proximal(-1.0)
    with pytest.raises(ValueError, match=r"`lam` must be >= 0, got nan"):
        proximal(float("nan"))
    with pytest.raises(TypeError, match=r"`base` must be an fmaml.inner_optim.InnerOptimizer"):
        proximal(1.0, "sgd")
    with pytest.raises(TypeError, match=r"without a `lam`"):
        proximal(1.0, proximal(1.0))
    with pytest.raises(ValueError, match=r"0-d"):
        proximal(torch.ones(2, dtype=DTYPE))


def test_cli_state_tests_imaml_on_its_proximal_inner_problem():
    """An --algorithm imaml run validates and tests with proximal(imaml_lam); other
    algorithms with their training inner optimiser."""
    state = init_state(resolve(TrainConfig(dataset="sinusoid", algorithm="imaml", imaml_lam=2.5)))
    assert state.inner_optimizer is None
    assert state.eval_inner_optimizer.hyper == {"lam": 2.5}
    plain = init_state(resolve(TrainConfig(dataset="sinusoid")))
    assert plain.eval_inner_optimizer is None
