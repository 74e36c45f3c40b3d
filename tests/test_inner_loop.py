"""fmaml.InnerLoop: the inner loop's settings as one immutable value.

Every entry point takes the settings only as an InnerLoop, and the engine gives the
definition's values and gradients for it (float64), on every variant and strategy; a
variant is the value with a field changed; anything else in its place, or a field the
function cannot honour, is refused with the name of the function called."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest_tasks import small_conv_problem as setup

import fmaml
from fmaml.algorithms import ALGORITHMS, get_algorithm, head_keys
from fmaml.inner_optim import adam

DTYPE = torch.float64


def variants(params) -> dict[str, dict]:
    """Each variant's settings as keywords (learned tensors among them)."""
    rates = fmaml.init_rates(params, 0.1)
    per_step = fmaml.init_rates(params, 0.1, per_element=False, num_steps=2)
    weight = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    return {
        "maml": dict(inner_lr=0.1, num_steps=2),
        "fomaml": dict(inner_lr=0.1, num_steps=2, first_order=True),
        "anil": dict(inner_lr=0.1, num_steps=2, adapt_keys=head_keys),
        "metasgd": dict(inner_lr=rates),
        "mamlpp": dict(inner_lr=per_step, num_steps=2, step_weights=[weight, 0.7]),
        "protomaml": dict(inner_lr=0.1, head_init="prototypes"),
        "protonet": dict(inner_lr=0.1, num_steps=0, head_init="prototypes"),
        "adam": dict(inner_lr=0.05, num_steps=2, inner_optimizer=adam()),
    }


def learned(settings: dict) -> list[torch.Tensor]:
    tensors = []
    for value in (settings.get("inner_lr"), settings.get("step_weights")):
        for t in torch.utils._pytree.tree_leaves(value):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                tensors.append(t)
    return tensors


@pytest.mark.parametrize("name", list(variants(setup()[1])))
@pytest.mark.parametrize(
    "strategy",
    [None, fmaml.Strategy(chunk_size=1), fmaml.Strategy(chunk_size=2, checkpoint=True)],
    ids=str,
)
def test_the_engine_gives_the_definition_for_an_inner_loop_value(name, strategy):
    loss_fn, params, tasks = setup()
    settings = variants(params)[name]
    if strategy is not None and strategy.checkpoint and name == "protonet":
        strategy = fmaml.Strategy(chunk_size=2)  # nothing to recompute without inner steps
    leaves = [*params.values(), *learned(settings)]
    value = fmaml.InnerLoop(**settings)
    definition = fmaml.meta_loss(loss_fn, params, tasks, value)
    expected = torch.autograd.grad(definition, leaves)
    loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, value, wrt=leaves, strategy=strategy)
    torch.testing.assert_close(loss, definition.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads.params.values(), expected, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(grads.wrt, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("objective", ["reptile", fmaml.IMAML(lam=2.0, cg_steps=3)], ids=str)
def test_reptile_and_imaml_take_the_value_too(objective):
    loss_fn, params, tasks = setup()
    leaves = list(params.values())
    value = fmaml.InnerLoop(inner_lr=0.1, num_steps=2)
    by_value = fmaml.meta_loss(loss_fn, params, tasks, value, objective=objective)
    loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, value, objective=objective)
    torch.testing.assert_close(loss, by_value.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads.params.values(), torch.autograd.grad(by_value, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_unroll_adapt_task_loss_and_evaluate_take_the_value():
    loss_fn, params, tasks = setup()
    task = fmaml.Task(tuple(t[0] for t in tasks.support), tuple(t[0] for t in tasks.query))
    value = fmaml.InnerLoop(inner_lr=0.1, num_steps=2, adapt_keys=head_keys)
    steps = fmaml.unroll(loss_fn, params, task.support, value)
    assert len(steps) == 3
    adapted = fmaml.adapt(loss_fn, params, task.support, value)
    for k in params:
        torch.testing.assert_close(adapted[k], steps[-1][k], rtol=0, atol=0)
        if not head_keys(k):  # ANIL: the body is held fixed
            assert steps[-1][k] is params[k]
    scores = fmaml.task_scores(loss_fn, loss_fn, params, task, value)
    torch.testing.assert_close(
        fmaml.task_loss(loss_fn, params, task, value), scores[-1], rtol=0, atol=0
    )
    score_fn = loss_fn.with_criterion(fmaml.accuracy)
    torch.testing.assert_close(
        fmaml.evaluate(score_fn, loss_fn, params, [tasks, tasks], value),
        fmaml.meta_scores(score_fn, loss_fn, params, tasks, value).repeat(2, 1),
        rtol=0,
        atol=1e-12,
    )


def test_a_variant_is_the_value_with_a_field_changed():
    maml = fmaml.InnerLoop(inner_lr=0.4, num_steps=5)
    fomaml = maml.replace(first_order=True)
    assert (fomaml.first_order, fomaml.inner_lr, fomaml.num_steps) == (True, 0.4, 5)
    assert maml.first_order is False, "replace builds a new value"
    with pytest.raises(dataclasses.FrozenInstanceError):
        maml.num_steps = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="unexpected keyword argument 'steps'"):
        maml.replace(steps=3)


KNOBS = {  # the module docstring's table: what each algorithm changes in MAML
    "maml": set(),
    "fomaml": {"first_order"},
    "anil": {"adapt_keys"},
    "boil": {"adapt_keys"},
    "metasgd": {"learned_rates"},
    "mamlpp": set(),  # its fixes are training-loop settings
    "reptile": {"first_order", "objective"},
    "protonet": {"head_init", "inner_steps"},
    "protomaml": {"head_init"},
    "imaml": {"objective"},
}


def test_every_named_algorithm_is_maml_with_knobs_changed():
    maml = get_algorithm("maml")
    for name, algorithm in ALGORITHMS.items():
        loop = algorithm.inner_loop(0.4, num_steps=3)
        assert loop.first_order == algorithm.first_order, name
        assert loop.adapt_keys is algorithm.adapt_keys, name
        assert loop.head_init == algorithm.head_init, name
        assert loop.num_steps == (3 if algorithm.inner_steps is None else algorithm.inner_steps)
        changed = {
            f.name
            for f in dataclasses.fields(algorithm)
            if f.name != "name" and getattr(algorithm, f.name) != getattr(maml, f.name)
        }
        assert changed == KNOBS[name], name
    assert get_algorithm("protonet").inner_loop(0.4, num_steps=3).num_steps == 0


def test_anything_but_an_inner_loop_value_is_refused_and_says_how():
    loss_fn, params, tasks = setup()
    task = fmaml.Task(tuple(t[0] for t in tasks.support), tuple(t[0] for t in tasks.query))
    with pytest.raises(
        TypeError,
        match=r"meta_loss\(\): .*fmaml.InnerLoop, got float.*"
        r"fmaml.InnerLoop\(0.1\)",
    ):
        fmaml.meta_loss(loss_fn, params, tasks, 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"meta_loss\(\): .*fmaml.InnerLoop, got dict"):
        fmaml.meta_loss(loss_fn, params, tasks, {"inner_lr": 0.1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"value_and_grad\(\): .*fmaml.InnerLoop, got float"):
        fmaml.value_and_grad(loss_fn, params, tasks, 0.1)  # type: ignore[arg-type]
    calls = {
        "unroll": lambda v: fmaml.unroll(loss_fn, params, task.support, v),
        "adapt": lambda v: fmaml.adapt(loss_fn, params, task.support, v),
        "task_loss": lambda v: fmaml.task_loss(loss_fn, params, task, v),
        "reptile_loss": lambda v: fmaml.reptile_loss(loss_fn, params, task, v),
        "imaml_loss": lambda v: fmaml.imaml_loss(loss_fn, params, task, v),
        "task_scores": lambda v: fmaml.task_scores(loss_fn, loss_fn, params, task, v),
        "meta_scores": lambda v: fmaml.meta_scores(loss_fn, loss_fn, params, tasks, v),
        "evaluate": lambda v: fmaml.evaluate(loss_fn, loss_fn, params, [tasks], v),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"{name}\(\): .*fmaml.InnerLoop, got int"):
            call(1)
    # the keywords of the settings are gone from every signature
    value = fmaml.InnerLoop(inner_lr=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_steps'"):
        fmaml.meta_loss(loss_fn, params, tasks, value, num_steps=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'inner_lr'"):
        fmaml.value_and_grad(loss_fn, params, tasks, inner_lr=0.2)  # type: ignore[call-arg]


def test_fields_a_function_cannot_honour_are_refused():
    loss_fn, params, tasks = setup()
    task = fmaml.Task(tuple(t[0] for t in tasks.support), tuple(t[0] for t in tasks.query))
    # adapt runs the one inner loop with every field: a prototype head too (ProtoNet's head
    # without inner steps)
    protonet = fmaml.InnerLoop(inner_lr=0.1, num_steps=0, head_init="prototypes")
    adapted = fmaml.adapt(loss_fn, params, task.support, protonet)
    head = fmaml.prototype_head(loss_fn, params, task.support)
    for k in params:
        torch.testing.assert_close(adapted[k], head[k], rtol=0, atol=0)
    weighted = fmaml.InnerLoop(inner_lr=0.1, num_steps=2, step_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"reptile_loss\(\): .*step_weights"):
        fmaml.reptile_loss(loss_fn, params, task, weighted)
    with pytest.raises(ValueError, match=r"imaml_loss\(\): .*\['inner_optimizer'\]"):
        fmaml.imaml_loss(loss_fn, params, task, fmaml.InnerLoop(0.1, inner_optimizer=adam()))


def test_the_training_state_builds_its_inner_loop_from_the_algorithm():
    from fmaml.training.train import init_state

    for name, expected in (
        ("fomaml", dict(first_order=True)),
        ("anil", dict(adapt_keys=head_keys)),
        ("maml", dict(first_order=False, adapt_keys=None)),
    ):
        state = init_state(
            fmaml.TrainConfig(
                dataset="sinusoid", algorithm=name, meta_batch=2, hidden=8, inner_steps=2
            )
        )
        loop = state.inner_loop(epoch=0)
        assert loop.num_steps == 2 and loop.inner_lr == state.config.inner_lr
        for field, value in expected.items():
            assert getattr(loop, field) is value, (name, field)
        evaluation = state.eval_inner_loop(5)
        assert evaluation.num_steps == 5 and evaluation.first_order is False
        assert evaluation.step_weights is None
