"""Tasks of any shape: a padded meta-batch (masks) computes what its tasks compute alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fmaml
from fmaml.algorithms import head_keys
from fmaml.engine.strategy import Strategy
from fmaml.nn.batchnorm import BatchNorm, with_stat_mask
from fmaml.tasks import pad_tasks

DTYPE = torch.float64
SIZE, HIDDEN, WAYS = 6, 3, 5
SHAPES = [(3, 1), (5, 2), (2, 3)]  # (ways, shots) of each task


def classification_task(ways, shots, num_query=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ys, yq = torch.arange(ways).repeat(shots), torch.arange(ways).repeat(num_query)
    xs = torch.randn(len(ys), 1, SIZE, SIZE, generator=g, dtype=DTYPE)
    xq = torch.randn(len(yq), 1, SIZE, SIZE, generator=g, dtype=DTYPE)
    return fmaml.Task((xs, ys), (xq, yq))


def mixed_tasks(shapes=SHAPES):
    return [classification_task(w, k, seed=i) for i, (w, k) in enumerate(shapes)]


def conv(num_ways=WAYS, seed=0):
    torch.manual_seed(seed)
    return fmaml.nn.conv4(num_ways, hidden=HIDDEN, image_size=SIZE).to(DTYPE)


def ways_of(task):
    return int(task.support[1].max()) + 1


def head_rows(params, ways):
    """The parameters of a ``ways``-way model: the first ``ways`` rows of the head."""
    return {k: v[:ways] if k.startswith("head.") else v for k, v in params.items()}


def alone(task, params, inner, criterion=F.cross_entropy):
    """``task_loss`` of one unpadded task on a model whose head has the task's ways."""
    ways = ways_of(task)
    loss_fn = fmaml.supervised_loss(conv(ways), criterion)
    return fmaml.task_loss(loss_fn, head_rows(params, ways), task, inner)


def fill_padding(batch, seed=1, value=None):
    """The padded rows of every set refilled: huge random numbers (or ``value``) in x,
    random labels among all the head's classes in y."""
    g = torch.Generator().manual_seed(seed)

    def refill(pair):
        x, y, mask, *rest = pair
        pad = ~mask
        noise = 1e6 * torch.randn(x.shape, generator=g, dtype=x.dtype)
        if value is not None:
            noise = torch.full_like(x, value)
        x = torch.where(pad.reshape(*pad.shape, *([1] * (x.dim() - 2))), noise, x)
        y = torch.where(pad, torch.randint(0, WAYS, y.shape, generator=g), y)
        return (x, y, mask, *rest)

    return fmaml.Task(refill(batch.support), refill(batch.query))


def grads_of(loss, params):
    return torch.autograd.grad(loss, list(params.values()))


def assert_close(a, b, tol=1e-10):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_close(u, v, tol)
        return
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- pad_tasks -----------------------------------------------------------------------------


def test_pad_tasks_shapes_masks_and_classes():
    tasks = mixed_tasks()
    batch = pad_tasks(tasks, num_ways=6)
    xs, ys, mask, classes = batch.support
    assert xs.shape == (3, 10, 1, SIZE, SIZE) and ys.shape == (3, 10)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [3, 10, 6]
    assert classes.shape == (3, 6) and classes.sum(1).tolist() == [3, 5, 2]
    assert batch.query[2].sum(1).tolist() == [6, 10, 4]
    for t, task in enumerate(tasks):
        n = len(task.support[1])
        assert torch.equal(xs[t, :n], task.support[0]) and torch.equal(ys[t, :n], task.support[1])
        assert not xs[t, n:].any()


def test_pad_tasks_regression_has_no_classes():
    g = torch.Generator().manual_seed(0)
    sets = [(torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)) for n in (2, 5)]
    batch = pad_tasks([fmaml.Task(s, s) for s in sets])
    assert len(batch.support) == 3 and batch.support[0].shape == (2, 5, 1)
    assert batch.support[2].sum(1).tolist() == [2, 5]


# --- BatchNorm statistics ------------------------------------------------------------------


def test_masked_batchnorm_statistics_equal_the_real_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 4, 4, generator=g, dtype=DTYPE)
    mask = torch.tensor([True, False, True, True, False, True, False])
    padded = torch.where(mask[:, None, None, None], x, 1e6)
    norm = BatchNorm(3).to(DTYPE)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(3, generator=g, dtype=DTYPE) + 0.5)
        norm.bias.copy_(torch.randn(3, generator=g, dtype=DTYPE))
    expected = norm(x[mask])
    assert_close(with_stat_mask(norm, mask)(padded)[mask], expected)
    # under vmap (two tasks, different masks) as well
    masks = torch.stack([mask, ~mask])
    both = torch.func.vmap(lambda x, m: with_stat_mask(norm, m)(x))(torch.stack([padded, x]), masks)
    assert_close(both[0][mask], expected)
    assert_close(both[1][~mask], norm(x[~mask]))
    assert norm.stat_mask is None  # the layer itself is never changed


def test_masked_batchnorm_second_order_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 3, generator=g, dtype=DTYPE, requires_grad=True)
    mask = torch.tensor([True, True, False, True, False])
    norm = BatchNorm(2).to(DTYPE)

    def f(x):
        return (with_stat_mask(norm, mask)(x)[mask] ** 3).sum()

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    (gx,) = torch.autograd.grad(f(x), x)
    assert not gx[~mask].any()  # padded rows get no gradient


# --- one padded task equals the task alone -------------------------------------------------


@pytest.mark.parametrize("num_ways", [None, WAYS])
def test_padded_loss_accuracy_and_gradients_equal_unpadded(num_ways):
    tasks = mixed_tasks()
    batch = fill_padding(pad_tasks(tasks, num_ways=num_ways))
    width = num_ways or WAYS
    params = fmaml.params_of(conv(width))
    loss_fn = fmaml.supervised_loss(conv(width), F.cross_entropy)
    score_fn = loss_fn.with_criterion(fmaml.accuracy)
    for t, task in enumerate(tasks):
        one = fmaml.Task(*(tuple(v[t] for v in pair) for pair in batch))
        ways = ways_of(task)
        small = fmaml.supervised_loss(conv(ways), F.cross_entropy)
        mine, theirs = head_rows(params, ways), params
        # the plain loss and accuracy of a padded set
        assert_close(loss_fn(theirs, one.support), small(mine, task.support))
        assert_close(
            score_fn(theirs, one.query), small.with_criterion(fmaml.accuracy)(mine, task.query)
        )
        # adapted, with the meta-gradient
        inner = fmaml.InnerLoop(0.3, num_steps=2)
        loss, acc = fmaml.task_loss(loss_fn, params, one, inner, score_fn=score_fn)
        ref = alone(task, params, inner)
        assert_close(loss, ref)
        assert_close(grads_of(loss, params), grads_of(ref, params))
        ref_acc = fmaml.task_scores(small.with_criterion(fmaml.accuracy), small, mine, task, inner)[
            -1
        ]
        assert_close(acc, ref_acc)


def test_meta_batch_of_mixed_shapes_equals_mean_of_tasks_alone():
    tasks = mixed_tasks()
    params = fmaml.params_of(conv())
    loss_fn = fmaml.supervised_loss(conv(), F.cross_entropy)
    inner = fmaml.InnerLoop(0.3, num_steps=2)
    loss = fmaml.meta_loss(loss_fn, params, pad_tasks(tasks), inner)
    reference = sum(alone(task, params, inner) for task in tasks) / len(tasks)
    assert_close(loss, reference)
    assert_close(grads_of(loss, params), grads_of(reference, params))


@pytest.mark.parametrize("value", [None, float("nan"), float("inf")])
def test_padded_values_change_nothing(value):
    params = fmaml.params_of(conv())
    loss_fn = fmaml.supervised_loss(conv(), F.cross_entropy)
    batch = pad_tasks(mixed_tasks())
    inner = fmaml.InnerLoop(0.3, num_steps=2)
    clean = fmaml.meta_loss(loss_fn, params, batch, inner)
    dirty = fmaml.meta_loss(loss_fn, params, fill_padding(batch, value=value), inner)
    assert torch.isfinite(dirty)
    assert_close(dirty, clean, 0)
    assert_close(grads_of(dirty, params), grads_of(clean, params), 0)


def test_regression_tasks_of_different_shots():
    g = torch.Generator().manual_seed(0)
    tasks = fmaml.tasks.SinusoidTasks(num_shots=5).sample(3, g)
    singles = [
        fmaml.Task(
            (tasks.support[0][t, :n].double(), tasks.support[1][t, :n].double()),
            (tasks.query[0][t, : n + 1].double(), tasks.query[1][t, : n + 1].double()),
        )
        for t, n in enumerate((2, 5, 3))
    ]
    model = fmaml.nn.mlp(hidden=(8,)).to(DTYPE)
    params, loss_fn = fmaml.params_of(model), fmaml.supervised_loss(model, F.mse_loss)
    batch = fill_padding_regression(pad_tasks(singles))
    inner = fmaml.InnerLoop(0.1, num_steps=2)
    loss = fmaml.meta_loss(loss_fn, params, batch, inner)
    reference = sum(fmaml.task_loss(loss_fn, params, t, inner) for t in singles) / 3
    assert_close(loss, reference)
    assert_close(grads_of(loss, params), grads_of(reference, params))


def fill_padding_regression(batch):
    def refill(pair):
        x, y, mask = pair
        pad = ~mask[..., None]
        return (torch.where(pad, 1e6, x), torch.where(pad, -1e6, y), mask)

    return fmaml.Task(refill(batch.support), refill(batch.query))


def mamlpp(loss_fn, params, num_steps=2):
    """MAML++'s BatchNorm: per-step weights and biases, statistics from the support set."""
    stepwise, stacked = fmaml.per_step(
        loss_fn.with_support_statistics(), params, loss_fn.batchnorm_keys(), num_steps
    )
    return stepwise, stacked


def test_support_statistics_of_padded_tasks_equal_the_tasks_alone():
    tasks = mixed_tasks()
    loss_fn, params = mamlpp(
        fmaml.supervised_loss(conv(), F.cross_entropy), fmaml.params_of(conv())
    )
    inner = fmaml.InnerLoop(0.3, num_steps=2, step_weights=[0.3, 0.7])
    batch = fill_padding(pad_tasks(tasks))
    loss = fmaml.meta_loss(loss_fn, params, batch, inner)
    reference = 0
    for task in tasks:
        ways = ways_of(task)
        small, _ = mamlpp(
            fmaml.supervised_loss(conv(ways), F.cross_entropy), head_rows(params, ways)
        )
        reference = reference + fmaml.task_loss(small, head_rows(params, ways), task, inner)
    reference = reference / len(tasks)
    expected = grads_of(loss, params)
    assert_close(loss, reference)
    assert_close(expected, grads_of(reference, params))
    for strategy in (Strategy(chunk_size=1), Strategy(chunk_size=2, checkpoint=True)):
        other, grads = fmaml.value_and_grad(loss_fn, params, batch, inner, strategy=strategy)
        assert_close(other, loss.detach())
        assert_close([grads.params[k] for k in params], expected)


def test_padded_support_statistics_equal_unpadded_and_ignore_the_query():
    """Leak-free on padded tasks: the query is normalised with the real support rows'
    statistics, as unpadded; one query example's loss doesn't depend on the others."""
    tasks = mixed_tasks()
    batch = fill_padding(pad_tasks(tasks))
    params = fmaml.params_of(conv())
    loss_fn = fmaml.supervised_loss(conv(), F.cross_entropy).with_support_statistics()
    small = fmaml.supervised_loss(conv(3), F.cross_entropy).with_support_statistics()
    one = fmaml.Task(*(tuple(v[0] for v in pair) for pair in batch))
    task, mine = tasks[0], head_rows(params, 3)
    x, y, mask, classes = one.query
    assert_close(
        loss_fn(params, one.query, stats_from=one.support),
        small(mine, task.query, stats_from=task.support[0]),
    )
    first = mask & (torch.arange(len(mask)) == 0)
    assert_close(
        loss_fn(params, (x, y, first, classes), stats_from=one.support),
        small(mine, (task.query[0][:1], task.query[1][:1]), stats_from=task.support[0]),
    )


# --- every strategy ------------------------------------------------------------------------

STRATEGIES = {
    "one-at-a-time": Strategy(chunk_size=1),
    "chunks-of-2": Strategy(chunk_size=2),
    "all-at-once-threads": Strategy(threads=1),
    "workers": Strategy(chunk_size=1, workers=2),
    "checkpoint": Strategy(checkpoint=True),
    "one-at-a-time-checkpoint": Strategy(chunk_size=1, checkpoint=True),
}

VARIANTS = {
    "maml": {},
    "fomaml-anil": {"first_order": True, "adapt_keys": head_keys},
    "msl-adam": {
        "step_weights": [0.4, 0.6],
        "inner_optimizer": fmaml.inner_optim.adam(),
    },
    "reptile": {"objective": "reptile"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_agrees_on_padded_tasks(name, variant):
    params = fmaml.params_of(conv())
    loss_fn = fmaml.supervised_loss(conv(), F.cross_entropy)
    score_fn = loss_fn.with_criterion(fmaml.accuracy)
    batch = fill_padding(pad_tasks(mixed_tasks()))
    settings = {"inner_lr": 0.3, "num_steps": 2, **VARIANTS[variant]}
    objective = settings.pop("objective", "query")
    inner = fmaml.InnerLoop(**settings)
    kwargs = {"score_fn": score_fn, "objective": objective}
    loss, score = fmaml.meta_loss(loss_fn, params, batch, inner, **kwargs)
    other, grads, other_score = fmaml.value_and_grad(
        loss_fn, params, batch, inner, strategy=STRATEGIES[name], **kwargs
    )
    assert_close(other, loss.detach())
    assert_close(other_score, score)
    assert_close([grads.params[k] for k in params], grads_of(loss, params))


def test_evaluation_scores_padded_tasks_like_the_tasks_alone():
    tasks = mixed_tasks()
    params = fmaml.params_of(conv())
    loss_fn = fmaml.supervised_loss(conv(), F.cross_entropy)
    score_fn = loss_fn.with_criterion(fmaml.accuracy)
    scores = fmaml.evaluate(
        score_fn, loss_fn, params, [pad_tasks(tasks)], fmaml.InnerLoop(0.3, num_steps=2)
    )
    for t, task in enumerate(tasks):
        ways = ways_of(task)
        small = fmaml.supervised_loss(conv(ways), F.cross_entropy)
        expected = fmaml.task_scores(
            small.with_criterion(fmaml.accuracy),
            small,
            head_rows(params, ways),
            task,
            fmaml.InnerLoop(0.3, num_steps=2),
        )
        assert_close(scores[t], expected)


# --- errors --------------------------------------------------------------------------------


def _setup():
    params = fmaml.params_of(conv())
    return params, fmaml.supervised_loss(conv(), F.cross_entropy), pad_tasks(mixed_tasks())


def _replace(batch, part, index, value):
    pair = list(getattr(batch, part))
    pair[index] = value
    return batch._replace(**{part: tuple(pair)})


def test_meta_loss_errors_name_the_cause():
    params, loss_fn, batch = _setup()
    run = lambda tasks, **kw: fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(0.1, **kw))  # noqa: E731
    mask = batch.support[2]
    with pytest.raises(
        ValueError, match=r"meta_loss\(\): the support `mask` must be bool \[num_tasks, n\]"
    ):
        run(_replace(batch, "support", 2, mask[:, :-1]))
    with pytest.raises(
        ValueError, match=r"meta_loss\(\): the support `mask` must be bool .* got torch.float64"
    ):
        run(_replace(batch, "support", 2, mask.double()))
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(
        ValueError, match=r"meta_loss\(\): task\(s\) \[1\] have no real support example"
    ):
        run(_replace(batch, "support", 2, empty))
    no_query = batch.query[2].clone()
    no_query[0] = False
    with pytest.raises(
        ValueError, match=r"meta_loss\(\): task\(s\) \[0\] have no real query example"
    ):
        run(_replace(batch, "query", 2, no_query))
    no_class = batch.query[3].clone()
    no_class[2] = False
    with pytest.raises(ValueError, match=r"meta_loss\(\): task\(s\) \[2\] have no class"):
        run(_replace(batch, "query", 3, no_class))
    with pytest.raises(
        ValueError, match=r"meta_loss\(\): head_init='prototypes' averages every support"
    ):
        run(batch, head_init="prototypes", num_steps=0)
    with pytest.raises(
        ValueError, match=r"value_and_grad\(\): Strategy\(compile=True\) is not tested with padded"
    ):
        fmaml.value_and_grad(
            loss_fn, params, batch, fmaml.InnerLoop(0.1), strategy=Strategy(compile=True)
        )
    one = fmaml.Task(*(tuple(v[0] for v in pair) for pair in batch))
    leak_free = loss_fn.with_support_statistics()
    with pytest.raises(ValueError, match="query set is padded but its BatchNorm statistics"):
        leak_free(params, one.query, stats_from=one.support[0])
    narrow = pad_tasks(mixed_tasks(), num_ways=6)
    with pytest.raises(
        ValueError,
        match=r"meta_loss\(\): a padded set's `classes` marks 6 classes but the model's output is",
    ):
        run(narrow)


def test_supervised_loss_checks_a_padded_set():
    params, loss_fn, batch = _setup()
    x, y, mask, classes = (t[0] for t in batch.support)
    with pytest.raises(ValueError, match=r"`mask` must be bool \[n\] for x \[n, ...\]"):
        loss_fn(params, (x, y, mask[:-1]))
    with pytest.raises(ValueError, match=r"`classes` must be bool \[C\]"):
        loss_fn(params, (x, y, mask, classes.long()))
    with pytest.raises(ValueError, match="padded set's y must have one row per example"):
        loss_fn(params, (x, y[:-1], mask))


def test_pad_tasks_errors_name_the_cause():
    good = mixed_tasks()
    with pytest.raises(ValueError, match="pad_tasks\\(\\): got no tasks"):
        pad_tasks([])
    with pytest.raises(ValueError, match="task 1 is not a single unpadded fmaml.Task"):
        pad_tasks([good[0], pad_tasks(good[:1])])
    empty = fmaml.Task((good[0].support[0][:0], good[0].support[1][:0]), good[0].query)
    with pytest.raises(ValueError, match=r"task\(s\) \[1\] have an empty support set"):
        pad_tasks([good[0], empty])
    reg = [fmaml.Task((torch.randn(2, 1), torch.randn(2, 1)), (torch.randn(2, 1),) * 2)]
    wide = classification_task(3, 1)
    wide = fmaml.Task((torch.randn(3, 1, 5, 5, dtype=DTYPE), wide.support[1]), wide.query)
    with pytest.raises(ValueError, match=r"the support x of every task must have the same shape"):
        pad_tasks([good[0], wide])
    gap = fmaml.Task((good[0].support[0], torch.tensor([0, 2, 3])), good[0].query)
    with pytest.raises(ValueError, match=r"got the classes \[0, 2, 3\]"):
        pad_tasks([gap])
    stray = fmaml.Task(good[0].support, (good[0].query[0], good[0].query[1] + 1))
    with pytest.raises(ValueError, match=r"query labels \[3\] are not among its support classes"):
        pad_tasks([stray])
    with pytest.raises(ValueError, match="`num_ways` is 4 but a task has 5 ways"):
        pad_tasks(good, num_ways=4)
    with pytest.raises(ValueError, match="`num_ways` pads the classes of classification"):
        pad_tasks(reg, num_ways=3)
