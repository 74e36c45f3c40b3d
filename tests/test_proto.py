"""ProtoNet (Snell et al. 2017) and ProtoMAML (Triantafillou et al. 2020) as
``head_init="prototypes"``: an independent autograd oracle, ProtoNet's loss at zero steps,
finite differences through the prototypes, every strategy, the CLI, every error message."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest_images import make_omniglot
from test_core import setup as core_setup
from torch import nn
from torch.func import functional_call

import fmaml
from fmaml.algorithms import body_keys, get_algorithm
from fmaml.errors import ConfigError
from fmaml.nn.models import Classifier
from fmaml.training.cli import main
from fmaml.training.config import TrainConfig, resolve
from fmaml.training.train import init_state

DTYPE = torch.float64
WAYS = 3


def conv_setup(num_tasks=3, seed=0):
    """test_core's conv4 meta-batch: 3-way, 2 support and 3 query per class, float64."""
    model, params, loss_fn, tasks = core_setup(num_tasks, seed)
    return model, params, loss_fn, tasks


def mlp_setup(num_tasks=3, seed=0, in_features=2, hidden=(5,)):
    """A tiny 3-way MLP classifier (no BatchNorm) on random 2-d points, float64."""
    torch.manual_seed(seed)
    model = fmaml.nn.mlp(in_features, hidden, WAYS).to(DTYPE)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num_tasks, 2 * WAYS, in_features, generator=g, dtype=DTYPE)
    xq = torch.randn(num_tasks, 3 * WAYS, in_features, generator=g, dtype=DTYPE)
    ys = torch.arange(WAYS).repeat(2).expand(num_tasks, -1)
    yq = torch.arange(WAYS).repeat(3).expand(num_tasks, -1)
    tasks = fmaml.Task(support=(xs, ys), query=(xq, yq))
    return model, fmaml.params_of(model), fmaml.supervised_loss(model, F.cross_entropy), tasks


def task_at(tasks, t):
    return fmaml.Task(*(tuple(x[t] for x in pair) for pair in tasks))


def num_tasks(tasks):
    return tasks.support[0].shape[0]


def grads_of(loss, params):
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def assert_dicts_close(a, b, **kwargs):
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kwargs, msg=lambda m, k=k: f"{k}: {m}")


# --- the independent oracle: plain torch, a Python loop over tasks ------------------------------


def embed(model, params, x):
    body = {k.removeprefix("body."): v for k, v in params.items() if k.startswith("body.")}
    return functional_call(model.body, body, (x,))


def class_means(z, y):
    """Each class's mean embedding, by boolean masks (not fmaml's one-hot product)."""
    return torch.stack([z[y == k].mean(0) for k in range(WAYS)])


def oracle_loss(model, params, tasks, inner_lr, num_steps, first_order=False):
    """ProtoMAML by hand: per task, the head from the support prototypes (W = 2c,
    b = -|c|^2), ``num_steps`` SGD steps with ``torch.autograd.grad``, the query loss."""
    total = 0
    for t in range(num_tasks(tasks)):
        (xs, ys), (xq, yq) = task_at(tasks, t)
        c = class_means(embed(model, params, xs), ys)
        # fresh nodes: the inner gradient is the support loss's partial derivative in each
        # of (body, head), the head a starting point, not tied to the body it came from
        w = {k: v.view_as(v) for k, v in params.items() if not k.startswith("head.")}
        w = {**w, "head.weight": 2 * c, "head.bias": -(c * c).sum(1)}
        for _ in range(num_steps):
            loss = F.cross_entropy(functional_call(model, w, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=not first_order)
            w = {k: v - inner_lr * g for (k, v), g in zip(w.items(), grads, strict=True)}
        total = total + F.cross_entropy(functional_call(model, w, (xq,)), yq)
    return total / num_tasks(tasks)


def oracle_grads(loss, params):
    """The oracle's gradients; the meta-learned head is not used, so its gradient is zero."""
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        k: torch.zeros_like(v) if g is None else g
        for (k, v), g in zip(params.items(), grads, strict=True)
    }


def protonet_loss(model, params, tasks):
    """ProtoNet (Snell et al. 2017): cross-entropy of minus squared Euclidean distances from
    each query embedding to the support prototypes; mean over tasks."""
    total = 0
    for t in range(num_tasks(tasks)):
        (xs, ys), (xq, yq) = task_at(tasks, t)
        c = class_means(embed(model, params, xs), ys)
        zq = embed(model, params, xq)
        distances = ((zq[:, None, :] - c[None, :, :]) ** 2).sum(-1)  # [n_q, ways]
        total = total + F.cross_entropy(-distances, yq)
    return total / num_tasks(tasks)


# --- (1) the oracle: value and meta-gradient ---------------------------------------------------


@pytest.mark.parametrize("setup", [conv_setup, mlp_setup])
@pytest.mark.parametrize("num_steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_loss_matches_an_autograd_loop(setup, num_steps, first_order):
    model, params, loss_fn, tasks = setup()
    kwargs = dict(inner_lr=0.1, num_steps=num_steps, first_order=first_order)
    inner = fmaml.InnerLoop(head_init="prototypes", **kwargs)
    loss = fmaml.meta_loss(loss_fn, params, tasks, inner)
    expected = oracle_loss(model, params, tasks, **kwargs)
    torch.testing.assert_close(loss, expected)
    got = grads_of(loss, params)
    assert_dicts_close(got, oracle_grads(expected, params))
    for k in ("head.weight", "head.bias"):  # replaced: exactly zero, and defined
        assert torch.equal(got[k], torch.zeros_like(got[k])), k
    assert all(got[k].abs().max() > 0 for k in params if k.startswith("body."))


def test_the_head_is_replaced_not_added():
    _model, params, loss_fn, tasks = mlp_setup()
    other = {**params, "head.weight": params["head.weight"].detach() * 7 + 1}
    inner = fmaml.InnerLoop(0.1, num_steps=2, head_init="prototypes")
    torch.testing.assert_close(
        fmaml.meta_loss(loss_fn, params, tasks, inner),
        fmaml.meta_loss(loss_fn, other, tasks, inner),
        rtol=0,
        atol=0,
    )


# --- (2) ProtoNet: no inner step --------------------------------------------------------------


@pytest.mark.parametrize("setup", [conv_setup, mlp_setup])
def test_zero_steps_is_protonet(setup):
    model, params, loss_fn, tasks = setup()
    loss = fmaml.meta_loss(
        loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=0, head_init="prototypes")
    )
    expected = protonet_loss(model, params, tasks)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert_dicts_close(grads_of(loss, params), oracle_grads(expected, params))


def test_prototype_logits_are_minus_squared_distances_up_to_a_constant():
    model, params, loss_fn, tasks = mlp_setup()
    (xs, ys), (xq, _) = task_at(tasks, 0)
    head = fmaml.prototype_head(loss_fn, params, (xs, ys))
    logits = loss_fn.predict(head, xq)
    zq, c = embed(model, params, xq), class_means(embed(model, params, xs), ys)
    distances = ((zq[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(logits, -distances + (zq**2).sum(-1, keepdim=True))


def test_task_scores_start_from_protonet():
    model, params, loss_fn, tasks = conv_setup()
    accuracy = loss_fn.with_criterion(fmaml.accuracy)
    scores = fmaml.meta_scores(
        accuracy, loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=0, head_init="prototypes")
    )
    assert scores.shape == (num_tasks(tasks), 1)
    for t in range(num_tasks(tasks)):
        (xs, ys), (xq, yq) = task_at(tasks, t)
        c = class_means(embed(model, params, xs), ys)
        predicted = torch.cdist(embed(model, params, xq), c).argmin(1)
        assert scores[t, 0] == (predicted == yq).double().mean()
    two = fmaml.meta_scores(
        accuracy, loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=2, head_init="prototypes")
    )
    assert two.shape == (num_tasks(tasks), 3) and torch.equal(two[:, 0], scores[:, 0])


# --- (3) the meta-gradient flows through the prototypes: finite differences ---------------------


@pytest.mark.parametrize("num_steps", [0, 1])
def test_gradcheck_through_the_prototypes(num_steps):
    _, params, loss_fn, tasks = mlp_setup(num_tasks=2, hidden=(3,))
    names = [k for k in params if k.startswith("body.")]

    def loss_of(*body):
        p = {**params, **dict(zip(names, body, strict=True))}
        return fmaml.meta_loss(
            loss_fn, p, tasks, fmaml.InnerLoop(0.3, num_steps=num_steps, head_init="prototypes")
        )

    inputs = tuple(params[k].detach().clone().requires_grad_() for k in names)
    # finite differences move the prototypes with the body: an analytic gradient that
    # missed the path through them (the next test shows it is not negligible) would fail
    assert torch.autograd.gradcheck(loss_of, inputs)
    assert torch.autograd.gradgradcheck(loss_of, inputs)


def test_cutting_the_prototype_path_changes_the_meta_gradient():
    _model, params, loss_fn, tasks = mlp_setup()
    inner = fmaml.InnerLoop(0.1, num_steps=1)
    full = grads_of(
        fmaml.meta_loss(loss_fn, params, tasks, inner.replace(head_init="prototypes")), params
    )

    def detached_head_loss(p):
        total = 0
        for t in range(num_tasks(tasks)):
            task = task_at(tasks, t)
            start = fmaml.prototype_head(
                loss_fn, {k: v.detach() for k, v in p.items()}, task.support
            )
            start = {**p, "head.weight": start["head.weight"], "head.bias": start["head.bias"]}
            adapted = fmaml.adapt(loss_fn, start, task.support, inner)
            total = total + loss_fn(adapted, task.query)
        return total / num_tasks(tasks)

    cut = oracle_grads(detached_head_loss(params), params)
    first = "body.0.weight"
    assert not torch.allclose(full[first], cut[first])


# --- (4) vmap equals a Python loop; purity ------------------------------------------------------


@pytest.mark.parametrize("num_steps", [0, 2])
def test_vmap_equals_a_python_loop_of_task_loss(num_steps):
    _, params, loss_fn, tasks = conv_setup()
    inner = fmaml.InnerLoop(0.1, num_steps=num_steps, head_init="prototypes")
    batched = fmaml.meta_loss(loss_fn, params, tasks, inner)
    looped = sum(
        fmaml.task_loss(loss_fn, params, task_at(tasks, t), inner) for t in range(num_tasks(tasks))
    ) / num_tasks(tasks)
    torch.testing.assert_close(batched, looped)
    assert_dicts_close(grads_of(batched, params), grads_of(looped, params))


def test_functions_are_pure():
    _, params, loss_fn, tasks = conv_setup()
    before = {k: v.detach().clone() for k, v in params.items()}
    tensors = [t.clone() for t in (*tasks.support, *tasks.query)]
    head = fmaml.prototype_head(loss_fn, params, task_at(tasks, 0).support)
    assert list(head) == list(params) and head is not params
    fmaml.meta_loss(
        loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=2, head_init="prototypes")
    )
    for k in params:
        assert torch.equal(params[k].detach(), before[k]), k
    for a, b in zip((*tasks.support, *tasks.query), tensors, strict=True):
        assert torch.equal(a, b)


# --- (5) every strategy gives the plain value, gradients and score ------------------------------

STRATEGIES = [
    fmaml.Strategy(chunk_size=1),
    fmaml.Strategy(chunk_size=2),
    fmaml.Strategy(chunk_size=1, checkpoint=True),
    fmaml.Strategy(chunk_size=2, checkpoint=True),
    fmaml.Strategy(chunk_size=1, workers=2),
    fmaml.Strategy(chunk_size=2, workers=2),
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
@pytest.mark.parametrize("num_steps", [0, 2])
def test_every_strategy_gives_the_plain_loss_gradient_and_score(strategy, num_steps):
    _, params, loss_fn, tasks = conv_setup()
    accuracy = loss_fn.with_criterion(fmaml.accuracy)
    inner = fmaml.InnerLoop(0.1, num_steps=num_steps, head_init="prototypes")
    loss, score = fmaml.meta_loss(loss_fn, params, tasks, inner, score_fn=accuracy)
    loss_s, grads_s, score_s = fmaml.value_and_grad(
        loss_fn, params, tasks, inner, score_fn=accuracy, strategy=strategy
    )
    torch.testing.assert_close(loss_s, loss.detach())
    torch.testing.assert_close(score_s, score)
    assert_dicts_close(grads_s.params, grads_of(loss, params))


@pytest.mark.parametrize("strategy", [None, fmaml.Strategy(chunk_size=2)], ids=str)
def test_anil_from_the_prototype_head(strategy):
    """Only the head adapted (ANIL-style ProtoMAML): still the oracle's meta-gradient."""
    model, params, loss_fn, tasks = mlp_setup()
    inner = fmaml.InnerLoop(
        0.1, num_steps=2, head_init="prototypes", adapt_keys=lambda k: k.startswith("head.")
    )
    if strategy is None:  # the definition
        loss = fmaml.meta_loss(loss_fn, params, tasks, inner)
        got = grads_of(loss, params)
    else:
        loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=strategy)
        got = grads.params
    total = 0
    for t in range(num_tasks(tasks)):
        (xs, ys), (xq, yq) = task_at(tasks, t)
        z, zq = embed(model, params, xs), embed(model, params, xq)
        c = class_means(z, ys)
        w, b = 2 * c, -(c * c).sum(1)
        for _ in range(2):
            gw, gb = torch.autograd.grad(
                F.cross_entropy(z @ w.T + b, ys), [w, b], create_graph=True
            )
            w, b = w - 0.1 * gw, b - 0.1 * gb
        total = total + F.cross_entropy(zq @ w.T + b, yq)
    expected = total / num_tasks(tasks)
    torch.testing.assert_close(loss.detach(), expected.detach())
    assert_dicts_close(got, oracle_grads(expected, params))


@pytest.mark.slow
def test_the_compiled_strategy_gives_the_plain_loss_and_gradient():
    _, params, loss_fn, tasks = mlp_setup()
    inner = fmaml.InnerLoop(0.1, num_steps=1, head_init="prototypes")
    plain = fmaml.meta_loss(loss_fn, params, tasks, inner)
    compiled, grads = fmaml.value_and_grad(
        loss_fn, params, tasks, inner, strategy=fmaml.Strategy(compile=True)
    )
    torch.testing.assert_close(compiled, plain.detach())
    assert_dicts_close(grads.params, grads_of(plain, params))


# --- (6) the algorithms, the config and the command line ----------------------------------------


def test_protonet_and_protomaml_are_named_algorithms():
    protonet, protomaml = get_algorithm("protonet"), get_algorithm("protomaml")
    assert protonet.head_init == protomaml.head_init == "prototypes"
    assert protonet.inner_steps == 0 and protomaml.inner_steps is None
    assert not protomaml.first_order and protomaml.objective == "query"
    config = resolve(TrainConfig(dataset="omniglot", algorithm="protonet"))
    assert config.inner_steps == 0 and config.eval_inner_steps == 0
    config = resolve(TrainConfig(dataset="omniglot", algorithm="protomaml"))
    assert config.inner_steps == 1 and config.eval_inner_steps == 3  # MAML's 5-way setting


@pytest.mark.parametrize("name", ["protonet", "protomaml"])
def test_the_algorithm_table_settings_match_the_oracle(name):
    """The table's values as meta_loss arguments (protomaml: 2 inner steps) give the
    oracle's loss and meta-gradient."""
    model, params, loss_fn, tasks = conv_setup()
    algorithm = get_algorithm(name)
    num_steps = 2 if algorithm.inner_steps is None else algorithm.inner_steps
    loss = fmaml.meta_loss(
        loss_fn,
        params,
        tasks,
        fmaml.InnerLoop(
            0.1,
            num_steps=num_steps,
            first_order=algorithm.first_order,
            adapt_keys=algorithm.adapt_keys,
            head_init=algorithm.head_init,
        ),
        objective=algorithm.objective,
    )
    expected = oracle_loss(model, params, tasks, 0.1, num_steps)
    torch.testing.assert_close(loss, expected)
    assert_dicts_close(grads_of(loss, params), oracle_grads(expected, params))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("algorithm", ["protonet", "protomaml"])
def test_cli_trains_and_tests_on_omniglot(tmp_path, isolated_cache, algorithm):
    make_omniglot(tmp_path / "omni", {f"Alpha{i}": 3 for i in range(4)}, images_per_character=4)
    run = tmp_path / "run"
    result = invoke(
        "train", "--dataset", "omniglot", "--data-root", tmp_path / "omni",
        "--split", "alphabet:0.5,0.25,0.25", "--algorithm", algorithm, "--ways", "2",
        "--meta-batch", "2", "--hidden", "4", "--iterations", "3", "--no-download",
        "--val-every", "3", "--val-episodes", "4", "--checkpoint-every", "3", "--out", run,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == 3
    saved = torch.load(run / "latest.pt", weights_only=False)
    config = saved["config"]
    assert config["algorithm"] == algorithm
    steps = 0 if algorithm == "protonet" else 1
    assert config["inner_steps"] == steps and saved["iteration"] == 3
    start = fmaml.params_of(fmaml.nn.conv4(2, hidden=4))  # a fresh model, the same names
    assert set(saved["params"]) == set(start)
    state = fmaml.restore_state(run / "latest.pt")
    assert all(torch.isfinite(v).all() for v in state.params.values())
    result = invoke("test", "--checkpoint", run / "latest.pt", "--episodes", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["inner_steps"] == (0 if algorithm == "protonet" else 3)
    said = "after 0 inner steps (ProtoNet: the prototype head alone)"
    assert (said in result.output) is (algorithm == "protonet")
    assert report["precision"] == "float32"
    assert len(report["accuracy_per_step"]) == report["inner_steps"] + 1
    assert 0 <= report["accuracy"] <= 100
    # more ways at test: the head has a row per prototype
    args = ["test", "--checkpoint", run / "latest.pt", "--episodes", "4", "--ways", "3"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    assert "trained 2-way: the head starts from each task's 3 class prototypes" in result.output
    assert json.loads(result.output.strip().splitlines()[-1])["ways"] == 3


def test_protonet_training_leaves_the_head_unchanged(tmp_path, isolated_cache):
    make_omniglot(tmp_path / "omni", {f"Alpha{i}": 3 for i in range(4)}, images_per_character=4)
    config = TrainConfig(
        dataset="omniglot",
        data_root=str(tmp_path / "omni"),
        split="alphabet:0.5,0.25,0.25",
        algorithm="protonet",
        ways=2,
        meta_batch=2,
        hidden=4,
        iterations=2,
        val_every=2,
        val_episodes=2,
        checkpoint_every=2,
    )
    start = {k: v.detach().clone() for k, v in init_state(config).params.items()}
    state = fmaml.fit(config, tmp_path / "run")
    assert state.iteration == 2
    # the head is replaced in every task: its gradient is zero and Adam leaves it as it was
    for k, v in state.params.items():
        assert torch.equal(v.detach(), start[k]) == k.startswith("head."), k


# --- every error message ------------------------------------------------------------------------


PROTO = fmaml.InnerLoop(0.1, num_steps=1, head_init="prototypes")


def proto_loss(loss_fn, params, tasks, **kwargs):
    return fmaml.meta_loss(loss_fn, params, tasks, PROTO, **kwargs)


def test_error_model_without_body_and_head():
    _, _, _, tasks = mlp_setup()
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, WAYS)).to(DTYPE)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    with pytest.raises(ValueError, match=r"need a model with `body` and `head` submodules.*"
                       r"got Sequential without them.*Classifier\(body"):  # fmt: skip
        proto_loss(loss_fn, fmaml.params_of(model), tasks)


@pytest.mark.parametrize(
    ("head", "shown"),
    [
        (nn.Sequential(nn.Linear(4, WAYS)), "is Sequential. Use"),
        (nn.Linear(4, WAYS, bias=False), "is Linear without a bias. Use"),
    ],
)
def test_error_head_not_linear_with_a_bias(head, shown):
    _, _, _, tasks = mlp_setup()
    model = Classifier(nn.Sequential(nn.Linear(2, 4), nn.ReLU()), head).to(DTYPE)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    with pytest.raises(ValueError, match=r"prototype heads replace a linear head.*" + shown):
        proto_loss(loss_fn, fmaml.params_of(model), tasks)


def test_error_loss_that_cannot_embed():
    _, params, loss_fn, tasks = mlp_setup()
    with pytest.raises(ValueError, match=r"meta_loss\(\): head_init='prototypes' embeds.*"
                       r"got function\. Use fmaml\.supervised_loss"):  # fmt: skip
        proto_loss(lambda p, b: loss_fn(p, b), params, tasks)


@pytest.mark.parametrize("change", ["missing", "ways"])
def test_error_params_head_shape(change):
    _, params, loss_fn, tasks = mlp_setup()
    if change == "missing":
        params = {k: v for k, v in params.items() if k != "head.bias"}
        got = r"'head.bias': None"
    else:
        params = {**params, "head.weight": torch.zeros(5, 5, dtype=DTYPE)}
        got = r"'head.weight': \[5, 5\]"
    with pytest.raises(ValueError, match=r"replaces the linear head of the model \(3 ways over "
                       r"5 features\); `params` must hold it with shapes .*" + got):  # fmt: skip
        proto_loss(loss_fn, params, tasks)


@pytest.mark.parametrize("caller", ["meta_loss", "task_loss"])
def test_error_labels_outside_the_ways(caller):
    _, params, loss_fn, tasks = mlp_setup()
    ys = tasks.support[1].clone()
    ys[1, 0] = 5
    tasks = fmaml.Task((tasks.support[0], ys), tasks.query)
    with pytest.raises(ValueError, match=rf"{caller}\(\): support labels must be classes 0..2 "
                       r"\(the head has 3 outputs\), got \[5\]"):  # fmt: skip
        if caller == "meta_loss":
            proto_loss(loss_fn, params, tasks)
        else:
            fmaml.task_loss(
                loss_fn, params, task_at(tasks, 1), fmaml.InnerLoop(0.1, head_init="prototypes")
            )


def test_error_class_missing_from_the_support_set():
    _, params, loss_fn, tasks = mlp_setup()
    ys = tasks.support[1].clone()
    ys[2] = torch.tensor([0, 1, 0, 1, 0, 1])  # no class 2 in task 2
    tasks = fmaml.Task((tasks.support[0], ys), tasks.query)
    with pytest.raises(ValueError, match=r"class 2 has no example in the support set of task 2, "
                       r"so it has no prototype.*num_shots >= 1"):  # fmt: skip
        proto_loss(loss_fn, params, tasks)


def test_error_float_labels():
    _, params, loss_fn, tasks = mlp_setup()
    tasks = fmaml.Task((tasks.support[0], tasks.support[1].double()), tasks.query)
    with pytest.raises(ValueError, match=r"needs integer support labels \(class indices\), got "
                       r"torch.float64"):  # fmt: skip
        proto_loss(loss_fn, params, tasks)


def test_error_labels_of_the_wrong_shape():
    _, params, loss_fn, tasks = mlp_setup()
    (xs, ys), _ = task_at(tasks, 0)
    with pytest.raises(ValueError, match=r"prototype_head\(\): the support labels must be "
                       r"integers \[n\] for x \[n, ...\], got torch.int64 \[1, 6\]"):  # fmt: skip
        fmaml.prototype_head(loss_fn, params, (xs, ys[None]))


def test_error_body_output_not_flat():
    model = Classifier(nn.Identity(), nn.Linear(4, WAYS)).to(DTYPE)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    x = torch.zeros(6, 1, 4, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"the model's body gives \[6, 1, 4\].*expected \[6, 4\]"
                       r". End the body with nn.Flatten\(\)"):  # fmt: skip
        fmaml.prototype_head(loss_fn, fmaml.params_of(model), (x, torch.arange(WAYS).repeat(2)))


@pytest.mark.parametrize("caller", ["meta_loss", "task_loss"])
def test_error_unknown_head_init(caller):
    _, params, loss_fn, tasks = mlp_setup()
    fn = getattr(fmaml, caller)
    data = tasks if caller == "meta_loss" else task_at(tasks, 0)
    with pytest.raises(ValueError, match=rf"{caller}\(\): `head_init` must be None .* or "
                       r"'prototypes' \(ProtoMAML/ProtoNet\), got 'zeros'"):  # fmt: skip
        fn(loss_fn, params, data, fmaml.InnerLoop(0.1, head_init="zeros"))


def test_error_reptile():
    _, params, loss_fn, tasks = mlp_setup()
    with pytest.raises(ValueError, match=r"objective='reptile' follows params - adapted, which "
                       r"has no term for it\. Use objective='query' \(ProtoMAML\)"):  # fmt: skip
        proto_loss(loss_fn, params, tasks, objective="reptile")


def test_error_zero_steps_without_prototype_head_is_unchanged():
    _, params, loss_fn, tasks = mlp_setup()
    with pytest.raises(
        ValueError, match=r"meta_loss\(\): `num_steps` must be a positive integer .*got 0"
    ):
        fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.1, num_steps=0))


def test_error_step_weights_without_steps():
    _, params, loss_fn, tasks = mlp_setup()
    with pytest.raises(ValueError, match=r"num_steps=0 has none\. Leave step_weights=None"):
        fmaml.meta_loss(loss_fn, params, tasks, PROTO.replace(num_steps=0, step_weights=[]))


def test_error_checkpoint_with_a_frozen_head():
    _, params, loss_fn, tasks = mlp_setup()
    strategy = fmaml.Strategy(chunk_size=1, checkpoint=True)
    with pytest.raises(ValueError, match=r"value_and_grad\(\): strategy .* recomputes the "
                       r"prototype head inside the first inner step.*leaves out "
                       r"\['head.bias', 'head.weight'\]\. Use checkpoint=False"):  # fmt: skip
        fmaml.value_and_grad(
            loss_fn, params, tasks, PROTO.replace(adapt_keys=body_keys), strategy=strategy
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(dataset="sinusoid", algorithm="protonet"), r"a sinusoid task is a regression"),
        (dict(algorithm="protonet", inner_steps=2), r"protonet takes no inner step in training, "
         r"got --inner-steps 2\. Drop --inner-steps, or use --algorithm protomaml"),
        (dict(algorithm="protomaml", inner_steps=0), r"got --inner-steps 0\. Use --inner-steps "
         r"1 or more, or --algorithm protonet"),
        (dict(algorithm="protomaml", eval_inner_steps=-1), r"--eval-inner-steps must be 0 or "
         r"more with --algorithm protomaml, got -1"),
        (dict(algorithm="protonet", lslr=True), r"--algorithm protonet takes no inner step, so "
         r"--lslr .* would change nothing"),
    ],
)  # fmt: skip
def test_error_config(changes, message):
    config = TrainConfig(**{"dataset": "omniglot", **changes})
    with pytest.raises(ConfigError, match=message):
        resolve(config)


def test_error_config_on_the_command_line(tmp_path):
    result = invoke(
        "train", "--dataset", "omniglot", "--algorithm", "protonet", "--inner-steps", "2",
        "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code != 0
    assert "--algorithm protonet takes no inner step in training" in result.output
