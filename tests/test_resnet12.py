"""ResNet-12: shapes, body./head. names, exact second-order meta-gradients (float64), errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gradients import image_tasks, oracle_meta_grad

import fmaml
from fmaml.algorithms import body_keys, head_keys
from fmaml.engine.strategy import Strategy

DTYPE = torch.float64
TINY = (2, 3, 3, 4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions on one intra-op thread: with two, OpenMP's spinning barriers make
    these tests several times slower on a machine whose other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(num_classes=3, in_channels=1, widths=TINY):
    torch.manual_seed(0)
    return fmaml.nn.resnet12(num_classes, in_channels, widths).to(DTYPE)


@pytest.mark.parametrize(
    "in_channels, widths, size",
    [(1, TINY, 16), (3, TINY, 17), (3, (4, 5, 6, 7), 32), (3, (2, 2, 2, 2), 84), (1, TINY, 24)],
)
def test_output_shapes(in_channels, widths, size):
    model = fmaml.nn.resnet12(5, in_channels, widths)
    x = torch.randn(3, in_channels, size, size)
    assert model(x).shape == (3, 5)
    assert model.body(x).shape == (3, widths[-1])
    # four 2x2 max-pools: the last block's map is size // 16 on a side
    assert model.body.block3(model.body.block2(model.body.block1(model.body.block0(x)))).shape == (
        3,
        widths[-1],
        size // 16,
        size // 16,
    )


def test_non_square_images():
    model = fmaml.nn.resnet12(4, 3, TINY)
    assert model(torch.randn(2, 3, 16, 40)).shape == (2, 4)


def test_default_is_metaoptnet_size():
    model = fmaml.nn.resnet12(5)
    widths = [model.body.get_submodule(f"block{i}").conv1.out_channels for i in range(4)]
    assert widths == [64, 160, 320, 640]
    assert model.head.in_features == 640
    # MetaOptNet's ResNet-12 without DropBlock: 12.4M parameters (with a 5-way head)
    assert 12.4e6 < sum(p.numel() for p in model.parameters()) < 12.5e6


def test_parameter_names_split_into_body_and_head():
    model = tiny_model()
    names = list(fmaml.params_of(model))
    assert names[-2:] == ["head.weight", "head.bias"]
    assert all(k.startswith("body.") for k in names[:-2])
    assert len(names) == 4 * (4 + 4 * 2) + 2  # per block 4 convs, 4 norms (weight, bias)
    for i in range(4):
        for j in (1, 2, 3):
            assert f"body.block{i}.conv{j}.weight" in names
            assert f"body.block{i}.norm{j}.bias" in names
        assert f"body.block{i}.shortcut.conv.weight" in names
        assert f"body.block{i}.shortcut.norm.weight" in names
    assert not any(k.endswith("conv1.bias") for k in names)  # conv then BatchNorm: no bias
    assert [k for k in names if head_keys(k)] == ["head.weight", "head.bias"]
    assert len([k for k in names if body_keys(k)]) == len(names) - 2
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    assert len(loss_fn.batchnorm_keys()) == 4 * 4 * 2


def test_block_is_residual():
    """With the three-conv branch's last BatchNorm scaled to zero the block is
    pool(act(shortcut(x))): the shortcut is added, not a layer in series."""
    model = tiny_model()
    block = model.body.block0
    x = torch.randn(4, 1, 16, 16, dtype=DTYPE)
    params = {k: v.detach() for k, v in block.named_parameters()}
    params["norm3.weight"] = torch.zeros_like(params["norm3.weight"])
    params["norm3.bias"] = torch.zeros_like(params["norm3.bias"])
    out = torch.func.functional_call(block, params, (x,))
    inner = {k.removeprefix("shortcut."): v for k, v in params.items() if "shortcut" in k}
    shortcut = torch.func.functional_call(block.shortcut, inner, (x,))
    torch.testing.assert_close(out, F.max_pool2d(F.leaky_relu(shortcut, 0.1), 2))
    assert not torch.allclose(out, block(x))


def test_support_statistics_reach_every_block():
    """With the query normalised by the support's statistics (MAML++ BNRS, leak-free), a
    query image's output does not depend on the other query images: every BatchNorm inside
    the residual blocks and shortcuts takes the support's statistics."""
    model = tiny_model()
    params = fmaml.params_of(model)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(2, 6, 1, 16, 16, generator=g, dtype=DTYPE)
    together = loss_fn.predict(params, query, stats_from=support)
    alone = loss_fn.predict(params, query[:1], stats_from=support)
    torch.testing.assert_close(together[:1], alone)
    assert not torch.allclose(loss_fn.predict(params, query)[:1], alone)


def meta_setup(num_steps=2):
    model = tiny_model()
    params = fmaml.params_of(model)
    tasks = image_tasks(num_tasks=2, num_ways=3, size=16)
    loss_fn = fmaml.supervised_loss(model, F.cross_entropy)
    return model, params, tasks, loss_fn, {"inner_lr": 0.1, "num_steps": num_steps}


def assert_grads_close(ours, reference, names):
    for name, a, b in zip(names, ours, reference, strict=True):
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("adapt", ["maml", "anil", "boil"])
def test_meta_gradient_equals_autograd_oracle(adapt):
    model, params, tasks, loss_fn, kwargs = meta_setup()
    kwargs["adapt_keys"] = {"maml": None, "anil": head_keys, "boil": body_keys}[adapt]
    loss = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(**kwargs))
    ours = torch.autograd.grad(loss, list(params.values()))
    reference = oracle_meta_grad(model, F.cross_entropy, params, tasks, **kwargs)
    assert_grads_close(ours, reference, list(params))
    assert all(g.abs().sum() > 0 for g in ours)  # every parameter is meta-learned


def test_anil_is_not_maml():
    """ANIL's meta-gradient (the oracle's with only the head adapted, tested above) differs
    from MAML's in the body and the head: the selection reaches resnet12's parameters."""
    _, params, tasks, loss_fn, kwargs = meta_setup()
    grads = {}
    for name, keys in (("maml", None), ("anil", head_keys)):
        loss = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(**kwargs, adapt_keys=keys))
        grads[name] = torch.autograd.grad(loss, list(params.values()))
    differs = [
        k for k, a, b in zip(params, grads["maml"], grads["anil"]) if not torch.allclose(a, b)
    ]
    assert "body.block0.conv1.weight" in differs and "head.weight" in differs


@pytest.mark.parametrize(
    "strategy",
    [Strategy(chunk_size=1), Strategy(chunk_size=1, checkpoint=True)],
    ids=["one-at-a-time", "one-at-a-time-checkpoint"],
)
@pytest.mark.parametrize("adapt", ["maml", "anil"])
def test_strategies_give_the_same_meta_gradient(strategy, adapt):
    _, params, tasks, loss_fn, kwargs = meta_setup(num_steps=3)
    kwargs["adapt_keys"] = head_keys if adapt == "anil" else None
    inner = fmaml.InnerLoop(**kwargs)
    plain = fmaml.meta_loss(loss_fn, params, tasks, inner)
    expected = torch.autograd.grad(plain, list(params.values()))
    loss, grads = fmaml.value_and_grad(loss_fn, params, tasks, inner, strategy=strategy)
    torch.testing.assert_close(loss, plain.detach(), rtol=1e-12, atol=1e-12)
    assert_grads_close([grads.params[k] for k in params], expected, list(params))


def test_first_order_equals_oracle():
    model, params, tasks, loss_fn, kwargs = meta_setup(num_steps=1)
    loss = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(**kwargs, first_order=True))
    ours = torch.autograd.grad(loss, list(params.values()))
    reference = oracle_meta_grad(model, F.cross_entropy, params, tasks, first_order=True, **kwargs)
    assert_grads_close(ours, reference, list(params))


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, r"`num_classes` must be a positive integer, got 0"),
        ({"num_classes": 5, "in_channels": 2.0}, r"`in_channels` must be a positive integer"),
        ({"num_classes": 5, "widths": (8, 8, 8)}, r"four positive integers.*got \(8, 8, 8\)"),
        ({"num_classes": 5, "widths": (8, 0, 8, 8)}, r"`widths` must be four positive integers"),
        ({"num_classes": 5, "widths": 64}, r"`widths` must be four.*got 64"),
        ({"num_classes": 5, "negative_slope": -0.1}, r"at least 0 \(0 is a ReLU\), got -0.1"),
        ({"num_classes": 5, "negative_slope": "0.1"}, r"`negative_slope` must be a number"),
    ],
)
def test_error_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fmaml.nn.resnet12(**kwargs)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 3, 15, 84), r"at least 16 .*got \[2, 3, 15, 84\]\. Resize the images to at least"),
        ((2, 1, 28, 28), r"\[n, 3, height, width\].*got \[2, 1, 28, 28\]\. .*in_channels=1 "),
        ((3, 84, 84), r"got \[3, 84, 84\]\. Pass a batch .*x\.unsqueeze\(0\)"),
    ],
)
def test_error_bad_input(shape, match):
    model = fmaml.nn.resnet12(5, widths=TINY)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_error_bad_input_inside_meta_loss():
    """The shape check runs under vmap too: a meta-batch of too-small images is refused."""
    _, params, _, loss_fn, kwargs = meta_setup(num_steps=1)
    tasks = image_tasks(num_tasks=2, num_ways=3, size=12)
    with pytest.raises(ValueError, match=r"meta_loss\(\): expected .*got \[6, 1, 12, 12\]"):
        fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(**kwargs))
