"""Contracts every variant honours, the reductions to MAML, and every error message."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fmaml
from fmaml.algorithms import ALGORITHMS, get_algorithm, head_keys
from fmaml.tree import combine, partition, tree_map

DTYPE = torch.float64


def setup(num_tasks=3, seed=0):
    torch.manual_seed(seed)
    model = fmaml.nn.conv4(3, hidden=4, image_size=12).to(DTYPE)
    params = fmaml.params_of(model)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num_tasks, 6, 1, 12, 12, generator=g, dtype=DTYPE)
    xq = torch.randn(num_tasks, 9, 1, 12, 12, generator=g, dtype=DTYPE)
    ys = torch.arange(3).repeat(2).expand(num_tasks, -1)
    yq = torch.arange(3).repeat(3).expand(num_tasks, -1)
    tasks = fmaml.Task(support=(xs, ys), query=(xq, yq))
    return model, params, fmaml.supervised_loss(model, F.cross_entropy), tasks


def variant(name, params):
    """The library's own algorithm table, turned into meta_loss arguments:
    ``(inner, objective)``."""
    algorithm = get_algorithm(name)
    inner_lr = 0.1
    if algorithm.learned_rates:
        inner_lr = fmaml.init_rates(
            params,
            0.1,
            adapt_keys=algorithm.adapt_keys,
            per_element=algorithm.learned_rates == "element",
        )
    inner = fmaml.InnerLoop(
        inner_lr,
        num_steps=2,
        first_order=algorithm.first_order,
        adapt_keys=algorithm.adapt_keys,
    )
    return inner, algorithm.objective


def grads_of(loss, params):
    return torch.autograd.grad(loss, list(params.values()))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_vmap_equals_python_loop(name):
    _, params, loss_fn, tasks = setup()
    inner, objective = variant(name, params)
    batched = fmaml.meta_loss(loss_fn, params, tasks, inner, objective=objective)
    looped = (
        sum(
            fmaml.task_loss(
                loss_fn,
                params,
                fmaml.Task(
                    (tasks.support[0][t], tasks.support[1][t]),
                    (tasks.query[0][t], tasks.query[1][t]),
                ),
                inner,
                objective=objective,
            )
            for t in range(3)
        )
        / 3
    )
    torch.testing.assert_close(batched, looped)
    for a, b in zip(grads_of(batched, params), grads_of(looped, params)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_functions_are_pure(name):
    _, params, loss_fn, tasks = setup()
    inner, objective = variant(name, params)
    before = {k: v.detach().clone() for k, v in params.items()}
    tasks_before = [t.clone() for t in (*tasks.support, *tasks.query)]
    support = (tasks.support[0][0], tasks.support[1][0])
    adapted = fmaml.adapt(loss_fn, params, support, inner)
    fmaml.meta_loss(loss_fn, params, tasks, inner, objective=objective).backward()
    assert set(adapted) == set(params) and list(adapted) == list(params)
    for k in params:
        assert torch.equal(params[k].detach(), before[k]), k
        assert adapted[k].shape == params[k].shape
    for a, b in zip((*tasks.support, *tasks.query), tasks_before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_adapting_lowers_the_support_loss(name):
    _, params, loss_fn, tasks = setup()
    inner, _ = variant(name, params)
    inner = inner.replace(first_order=False)
    support = (tasks.support[0][0], tasks.support[1][0])
    adapted = fmaml.adapt(loss_fn, params, support, inner)
    assert loss_fn(adapted, support) < loss_fn(params, support)
    chosen = [k for k in params if inner.adapt_keys is None or inner.adapt_keys(k)]
    for k in params:
        assert (adapted[k] is params[k]) != (k in chosen), k  # frozen keys pass through


def test_unroll_returns_every_step():
    _, params, loss_fn, tasks = setup()
    steps = fmaml.unroll(
        loss_fn,
        params,
        (tasks.support[0][0], tasks.support[1][0]),
        fmaml.InnerLoop(0.1, num_steps=3),
    )
    assert len(steps) == 4 and steps[0] == dict(params)


# --- reductions to MAML ------------------------------------------------------------------------


def assert_same_meta_gradient(params, loss_a, loss_b):
    for a, b in zip(grads_of(loss_a, params), grads_of(loss_b, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_metasgd_with_uniform_rates_is_maml():
    _, params, loss_fn, tasks = setup()
    rates = fmaml.init_rates(params, 0.1)
    assert_same_meta_gradient(
        params,
        fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(rates, num_steps=2)),
        fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=2)),
    )


def test_anil_over_every_key_is_maml():
    _, params, loss_fn, tasks = setup()
    assert_same_meta_gradient(
        params,
        fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.1, adapt_keys=list(params))),
        fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.1)),
    )


def test_last_step_weights_and_constant_per_step_rates_are_maml():
    _, params, loss_fn, tasks = setup()
    maml = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=3))
    weighted = fmaml.meta_loss(
        loss_fn,
        params,
        tasks,
        fmaml.InnerLoop([0.1, 0.1, 0.1], num_steps=3, step_weights=[0.0, 0.0, 1.0]),
    )
    assert_same_meta_gradient(params, weighted, maml)


def test_per_tensor_rates_receive_meta_gradients():
    _, params, loss_fn, tasks = setup()
    rates = fmaml.init_rates(params, 0.1, per_element=False, num_steps=2)
    loss = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(rates, num_steps=2))
    grads = torch.autograd.grad(loss, [r for step in rates for r in step.values()])
    assert all(g.shape == () for g in grads)
    assert sum(g.abs() for g in grads) > 0


def test_first_order_differs_from_second_order():
    _, params, loss_fn, tasks = setup()
    second = grads_of(fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.4)), params)
    first = grads_of(
        fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.4, first_order=True)), params
    )
    assert not all(torch.allclose(a, b) for a, b in zip(first, second))


def test_score_fn_reports_query_accuracy():
    _, params, loss_fn, tasks = setup()
    loss, score = fmaml.meta_loss(
        loss_fn,
        params,
        tasks,
        fmaml.InnerLoop(0.1),
        score_fn=loss_fn.with_criterion(fmaml.accuracy),
    )
    assert loss.requires_grad and not score.requires_grad
    assert 0.0 <= score.item() <= 1.0


# --- models ------------------------------------------------------------------------------------


def test_model_with_unused_parameters_works():
    class Partly(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(1, 1), nn.Linear(1, 1)

        def forward(self, x):
            return self.used(x)

    model = Partly().to(DTYPE)
    params = fmaml.params_of(model)
    tasks = fmaml.tasks.SinusoidTasks(5).sample(2, torch.Generator().manual_seed(0), dtype=DTYPE)
    loss = fmaml.meta_loss(
        fmaml.supervised_loss(model, F.mse_loss), params, tasks, fmaml.InnerLoop(0.01)
    )
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert grads[0] is not None and grads[2] is None


def test_torch_batchnorm_is_replaced_by_batch_statistics():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    assert isinstance(model[1], nn.BatchNorm2d)  # the user's model is untouched
    assert isinstance(loss_fn.module[1], fmaml.nn.BatchNorm)
    assert set(fmaml.params_of(model)) == set(loss_fn.param_names)
    x = torch.randn(4, 1, 4, 4)
    out = loss_fn.predict(fmaml.params_of(model), x)
    reference = model.train()(x)
    torch.testing.assert_close(out, reference)


def test_frozen_parameters_are_passed_as_constants():
    model = fmaml.nn.mlp()
    model.body[0].weight.requires_grad_(False)
    params = fmaml.params_of(model)
    assert "body.0.weight" not in params
    loss_fn = fmaml.supervised_loss(model, F.mse_loss)
    assert loss_fn(params, (torch.zeros(3, 1), torch.zeros(3, 1))).shape == ()


def test_conv4_shapes():
    assert fmaml.nn.conv4(5)(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    mini = fmaml.nn.conv4(5, in_channels=3, hidden=32, image_size=84)
    assert mini(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    assert any(isinstance(m, nn.MaxPool2d) for m in mini.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in fmaml.nn.conv4(5).modules())


def test_tree_helpers():
    params = {"body.w": torch.ones(2), "head.w": torch.zeros(2)}
    head, body = partition(params, head_keys)
    assert list(head) == ["head.w"] and list(body) == ["body.w"]
    assert combine(body, head) == {**body, **head}
    doubled = tree_map(lambda a, b: a + b, params, params)
    assert torch.equal(doubled["body.w"], torch.full((2,), 2.0))


# --- every error message -----------------------------------------------------------------------


@pytest.fixture
def small():
    _, params, loss_fn, tasks = setup(num_tasks=2)
    return params, loss_fn, tasks, (tasks.support[0][0], tasks.support[1][0])


def test_error_rate_dict_keys(small):
    params, loss_fn, _, support = small
    rates = fmaml.init_rates(params, 0.1, adapt_keys=head_keys)
    rates["head.wieght"] = rates.pop("head.weight")
    with pytest.raises(
        ValueError,
        match=r"(?s)keys don't match.*missing:    \['head.weight'\]"
        r".*unexpected: \['head.wieght'\].*same partition as `adapt_keys`",
    ):
        fmaml.adapt(loss_fn, params, support, fmaml.InnerLoop(rates, adapt_keys=head_keys))


def test_error_rate_shape(small):
    params, loss_fn, _, support = small
    rates = fmaml.init_rates(params, 0.1, adapt_keys=head_keys)
    rates["head.bias"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"inner_lr\['head.bias'\]` has shape \[7\]; expected"):
        fmaml.adapt(loss_fn, params, support, fmaml.InnerLoop(rates, adapt_keys=head_keys))


def test_error_tensor_rate_not_scalar(small):
    params, loss_fn, _, support = small
    with pytest.raises(ValueError, match="must be 0-d, got shape \\[2\\]"):
        fmaml.adapt(loss_fn, params, support, fmaml.InnerLoop(torch.ones(2)))


def test_error_rate_type(small):
    params, loss_fn, _, support = small
    with pytest.raises(TypeError, match="must be a number, a 0-d tensor, a dict"):
        fmaml.adapt(loss_fn, params, support, fmaml.InnerLoop("0.1"))


def test_error_rate_sequence_length(small):
    params, loss_fn, _, support = small
    with pytest.raises(ValueError, match="sequence of 2 per-step rates but `num_steps` is 3"):
        fmaml.adapt(loss_fn, params, support, fmaml.InnerLoop([0.1, 0.1], num_steps=3))


def test_error_empty_selection(small):
    params, loss_fn, _, support = small
    with pytest.raises(ValueError, match="selects no parameter to adapt"):
        fmaml.adapt(loss_fn, params, support, fmaml.InnerLoop(0.1, adapt_keys=lambda k: False))


def test_error_unknown_keys(small):
    params, loss_fn, _, support = small
    with pytest.raises(ValueError, match=r"names parameters the model does not have"):
        fmaml.adapt(loss_fn, params, support, fmaml.InnerLoop(0.1, adapt_keys=["head.wieght"]))


def test_error_string_keys(small):
    params, loss_fn, _, support = small
    with pytest.raises(TypeError, match=r"Wrap it in a list: adapt_keys=\['head.weight'\]"):
        fmaml.adapt(loss_fn, params, support, fmaml.InnerLoop(0.1, adapt_keys="head.weight"))


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_error_num_steps(small, steps):
    params, loss_fn, _, support = small
    with pytest.raises(ValueError, match="`num_steps` must be a positive integer"):
        fmaml.adapt(loss_fn, params, support, fmaml.InnerLoop(0.1, num_steps=steps))


def test_error_step_weights_length(small):
    params, loss_fn, tasks, _ = small
    with pytest.raises(ValueError, match="`step_weights` has 1 entries but `num_steps` is 2"):
        fmaml.meta_loss(
            loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=2, step_weights=[1.0])
        )


def test_error_task_axis(small):
    params, loss_fn, tasks, support = small
    with pytest.raises(ValueError, match=r"same leading task axis.*add the axis with x\[None\]"):
        fmaml.meta_loss(loss_fn, params, fmaml.Task(support, tasks.query), fmaml.InnerLoop(0.1))
    with pytest.raises(TypeError, match="must be an fmaml.Task"):
        fmaml.meta_loss(loss_fn, params, (tasks.support, tasks.query), fmaml.InnerLoop(0.1))


def test_error_params_keys(small):
    params, loss_fn, _, support = small
    wrong = dict(params)
    wrong["head.wieght"] = wrong.pop("head.weight")
    with pytest.raises(
        ValueError,
        match=r"(?s)does not match the model.*missing:    "
        r"\['head.weight'\].*Build params with fmaml.params_of",
    ):
        loss_fn(wrong, support)


def test_error_unknown_algorithm():
    with pytest.raises(ValueError, match=r"unknown algorithm 'mmal'; expected one of"):
        get_algorithm("mmal")


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"num_classes": 5, "hidden": -1}])
def test_error_conv4_sizes(bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        fmaml.nn.conv4(**bad)


def test_error_sinusoid_shots():
    with pytest.raises(ValueError, match="`num_shots` must be a positive integer, got 0"):
        fmaml.tasks.SinusoidTasks(num_shots=0)


def test_error_tree_helpers():
    with pytest.raises(ValueError, match=r"share keys \['a'\]"):
        combine({"a": torch.ones(1)}, {"a": torch.ones(1)})
    with pytest.raises(KeyError, match=r"missing: \['b'\]"):
        tree_map(lambda a, b: a, {"b": torch.ones(1)}, {"a": torch.ones(1)})
