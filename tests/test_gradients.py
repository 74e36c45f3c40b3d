"""The meta-gradients are exact: closed forms, an independent autograd oracle, gradcheck."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import fmaml
from fmaml.algorithms import body_keys, head_keys

DTYPE = torch.float64


# --- closed form: L(w) = 1/2 ||w - c||^2 ------------------------------------------------------


def quadratic(params, batch):
    target, _ = batch
    return 0.5 * ((params["w"] - target) ** 2).sum()


@settings(max_examples=40, deadline=None)
@given(
    dim=st.integers(1, 6),
    num_steps=st.integers(1, 5),
    rate=st.floats(0.01, 0.9),
    seed=st.integers(0, 2**31 - 1),
    first_order=st.booleans(),
)
def test_closed_form_meta_gradient(dim, num_steps, rate, seed, first_order):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g, dtype=DTYPE).requires_grad_()
    c_s, c_q = torch.randn(2, dim, generator=g, dtype=DTYPE)
    task = fmaml.Task(support=(c_s, c_s), query=(c_q, c_q))

    adapted = fmaml.adapt(
        quadratic, {"w": w}, task.support, fmaml.InnerLoop(rate, num_steps=num_steps)
    )
    expected_w = c_s + (1 - rate) ** num_steps * (w - c_s)
    torch.testing.assert_close(adapted["w"], expected_w, rtol=1e-12, atol=1e-12)

    loss = fmaml.task_loss(
        quadratic,
        {"w": w},
        task,
        fmaml.InnerLoop(rate, num_steps=num_steps, first_order=first_order),
    )
    (meta_grad,) = torch.autograd.grad(loss, [w])
    factor = 1.0 if first_order else (1 - rate) ** num_steps
    torch.testing.assert_close(meta_grad, factor * (expected_w - c_q), rtol=1e-10, atol=1e-12)


def test_inner_lr_gradient_matches_closed_form():
    # d/dα of 1/2||w_1 - c_q||^2 with w_1 = w - α (w - c_s) is -(w_1 - c_q)·(w - c_s).
    g = torch.Generator().manual_seed(1)
    w, c_s, c_q = torch.randn(3, 4, generator=g, dtype=DTYPE)
    rate = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    task = fmaml.Task(support=(c_s, c_s), query=(c_q, c_q))
    loss = fmaml.task_loss(quadratic, {"w": w}, task, fmaml.InnerLoop(rate))
    (d_rate,) = torch.autograd.grad(loss, [rate])
    w_1 = w - 0.3 * (w - c_s)
    torch.testing.assert_close(d_rate, -((w_1 - c_q) * (w - c_s)).sum())


# --- an independent oracle: a loop over tasks with torch.autograd.grad -------------------------


def oracle_meta_grad(
    module, criterion, params, tasks, *, inner_lr, num_steps, adapt_keys=None, first_order=False
):
    """Plain autograd, one task at a time, on the *original* module (torch's own layers)."""
    names = [k for k in params if adapt_keys is None or adapt_keys(k)]
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()}
    num_tasks = tasks.support[0].shape[0]

    def loss(p, x, y):
        bufs = {k: b.clone() for k, b in buffers.items()}  # running stats are updated in place
        return criterion(torch.func.functional_call(module, {**bufs, **p}, (x,)), y)

    total = 0.0
    for t in range(num_tasks):
        fast = dict(params)
        for _ in range(num_steps):
            support_loss = loss(fast, tasks.support[0][t], tasks.support[1][t])
            grads = torch.autograd.grad(
                support_loss,
                [fast[k] for k in names],
                create_graph=not first_order,
                allow_unused=True,
            )
            for k, grad in zip(names, grads):
                if grad is None:
                    continue
                rate = inner_lr[k] if isinstance(inner_lr, dict) else inner_lr
                fast[k] = fast[k] - rate * grad
        total = total + loss(fast, tasks.query[0][t], tasks.query[1][t]) / num_tasks
    leaves = list(params.values()) + _rate_leaves(inner_lr)
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads)]


def _rate_leaves(inner_lr):
    return list(inner_lr.values()) if isinstance(inner_lr, dict) else []


class CustomNet(nn.Module):
    """Not one of ours: torch's BatchNorm2d with running statistics, and an unused layer."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten()
        )
        self.unused = nn.Linear(2, 2)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.features(x))


def image_tasks(num_tasks, num_ways, size, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num_tasks, num_ways * 2, channels, size, size, generator=g, dtype=DTYPE)
    xq = torch.randn(num_tasks, num_ways * 3, channels, size, size, generator=g, dtype=DTYPE)
    ys = torch.arange(num_ways).repeat(2).expand(num_tasks, -1)
    yq = torch.arange(num_ways).repeat(3).expand(num_tasks, -1)
    return fmaml.Task(support=(xs, ys), query=(xq, yq))


def sinusoid_tasks(num_tasks=4, seed=0):
    return fmaml.tasks.SinusoidTasks(num_shots=5).sample(
        num_tasks, torch.Generator().manual_seed(seed), dtype=DTYPE
    )


MODELS = {
    "conv4": (
        lambda: fmaml.nn.conv4(3, hidden=4, image_size=12),
        lambda: image_tasks(3, 3, 12),
        F.cross_entropy,
    ),
    "mlp": (lambda: fmaml.nn.mlp(hidden=(8, 8)), sinusoid_tasks, F.mse_loss),
    "custom-batchnorm": (CustomNet, lambda: image_tasks(3, 3, 6), F.cross_entropy),
}

VARIANTS = {
    "maml": {},
    "fomaml": {"first_order": True},
    "anil": {"adapt_keys": head_keys},
    "boil": {"adapt_keys": body_keys},
    "metasgd": {"learned_rates": True},
    "maml-3-steps": {"num_steps": 3},
}


def build(model_name, variant_name):
    torch.manual_seed(0)
    make_model, make_tasks, criterion = MODELS[model_name]
    model = make_model().to(DTYPE)
    params = fmaml.params_of(model)
    variant = dict(VARIANTS[variant_name])
    inner_lr = 0.1
    if variant.pop("learned_rates", False):
        g = torch.Generator().manual_seed(3)
        inner_lr = {
            k: (0.05 + 0.1 * torch.rand(v.shape, generator=g, dtype=DTYPE)).requires_grad_()
            for k, v in params.items()
        }
    kwargs = {"inner_lr": inner_lr, "num_steps": 1, **variant}
    return model, criterion, params, make_tasks(), kwargs


@pytest.mark.parametrize("variant_name", list(VARIANTS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_vmapped_meta_gradient_equals_autograd_oracle(model_name, variant_name):
    model, criterion, params, tasks, kwargs = build(model_name, variant_name)
    if model_name == "custom-batchnorm" and kwargs.get("adapt_keys") is body_keys:
        kwargs["adapt_keys"] = lambda k: k.startswith("features.")
    loss_fn = fmaml.supervised_loss(model, criterion)
    loss = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(**kwargs))
    leaves = list(params.values()) + _rate_leaves(kwargs["inner_lr"])
    ours = torch.autograd.grad(loss, leaves, allow_unused=True)
    reference = oracle_meta_grad(model, criterion, params, tasks, **kwargs)
    for name, a, b in zip(list(params) + ["rate"] * 99, ours, reference):
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"{name}")
    assert any(g is not None and g.abs().sum() > 0 for g in ours)


def test_torch_batchnorm_under_vmap_is_why_we_replace_it():
    """Documents the bug we route around: torch's BatchNorm batching rule is inexact."""
    model, criterion, params, tasks, kwargs = build("custom-batchnorm", "maml")
    raw = fmaml.SupervisedLoss.__new__(fmaml.SupervisedLoss)
    raw.module, raw.criterion, raw.param_names = model, criterion, list(params)
    raw.fixed = {k: b.detach().clone() for k, b in model.named_buffers()}
    raw.module.eval()  # running statistics are in-place state vmap cannot update
    ours = fmaml.supervised_loss(model, criterion)
    grads = {}
    for name, loss_fn in (("ours", ours), ("eval-mode torch", raw)):
        loss = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(**kwargs))
        grads[name] = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    reference = oracle_meta_grad(model.train(), criterion, params, tasks, **kwargs)
    torch.testing.assert_close(grads["ours"][0], reference[0])
    assert not torch.allclose(grads["eval-mode torch"][0], reference[0])


def test_gradcheck_and_gradgradcheck_meta_loss():
    torch.manual_seed(0)
    model = fmaml.nn.mlp(hidden=(3,)).to(DTYPE)
    params = fmaml.params_of(model)
    loss_fn = fmaml.supervised_loss(model, F.mse_loss)
    tasks = sinusoid_tasks(num_tasks=2)
    names = list(params)

    def f(*leaves):
        return fmaml.meta_loss(
            loss_fn, dict(zip(names, leaves)), tasks, fmaml.InnerLoop(0.1, num_steps=2)
        )

    leaves = tuple(params.values())
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


def test_finite_differences_on_conv4():
    torch.manual_seed(0)
    model, criterion, params, tasks, kwargs = build("conv4", "maml")
    loss_fn = fmaml.supervised_loss(model, criterion)
    loss = fmaml.meta_loss(loss_fn, params, tasks, fmaml.InnerLoop(**kwargs))
    (grad,) = torch.autograd.grad(loss, [params["head.bias"]])
    eps = 1e-6
    for i in range(grad.numel()):
        bumped = []
        for sign in (1, -1):
            shifted = dict(params)
            delta = torch.zeros_like(params["head.bias"])
            delta[i] = sign * eps
            shifted["head.bias"] = params["head.bias"].detach() + delta
            bumped.append(
                fmaml.meta_loss(loss_fn, shifted, tasks, fmaml.InnerLoop(**kwargs)).item()
            )
        assert abs((bumped[0] - bumped[1]) / (2 * eps) - grad[i].item()) < 1e-7
