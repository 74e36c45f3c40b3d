"""fmaml.value_and_grad: the meta-loss and the meta-gradients of exactly the inputs given,
on every strategy equal to the pure definition (fmaml.meta_loss + autograd), float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest_tasks import small_conv_problem

import fmaml

DTYPE = torch.float64
STRATEGIES = [
    None,  # auto_strategy's choice
    fmaml.Strategy(),
    fmaml.Strategy(chunk_size=1),
    fmaml.Strategy(chunk_size=2),
    fmaml.Strategy(chunk_size=1, checkpoint=True),
    fmaml.Strategy(chunk_size=1, workers=2),
]


def setup(temperature: torch.Tensor):
    return small_conv_problem(lambda out, y: F.cross_entropy(out * temperature, y))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_the_gradients_of_params_rates_step_weights_and_a_captured_tensor(strategy):
    log_temp = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    loss_fn, params, tasks = setup(log_temp.exp())
    g = torch.Generator().manual_seed(2)
    rates = {
        k: (0.05 + 0.1 * torch.rand(v.shape, generator=g, dtype=DTYPE)).requires_grad_()
        for k, v in params.items()
    }
    weights = [torch.tensor(0.4, dtype=DTYPE, requires_grad=True), 0.6]
    inner = fmaml.InnerLoop(rates, num_steps=2, step_weights=weights)

    reference = fmaml.meta_loss(loss_fn, params, tasks, inner)
    leaves = [*params.values(), *rates.values(), weights[0], log_temp]
    # the graph of log_temp.exp() is shared with the call below: keep it
    expected = torch.autograd.grad(reference, leaves, retain_graph=True)

    loss, grads = fmaml.value_and_grad(
        loss_fn, params, tasks, inner, wrt=[log_temp], strategy=strategy
    )
    assert not loss.requires_grad, "the value is not a graph to differentiate again"
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)
    got = [
        *grads.params.values(),
        *grads.inner_lr.values(),
        grads.step_weights[0],
        grads.wrt[0],
    ]
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"input {i}")
    assert grads.step_weights[1] is None, "a number has no gradient"
    assert list(grads.params) == list(params)


def test_inputs_that_do_not_require_grad_get_none_and_a_score_comes_back():
    loss_fn, params, tasks = setup(torch.tensor(1.0, dtype=DTYPE))
    frozen = {k: v.detach() if k.startswith("head.") else v for k, v in params.items()}
    score_fn = loss_fn.with_criterion(fmaml.accuracy)
    loss, grads, score = fmaml.value_and_grad(
        loss_fn, frozen, tasks, fmaml.InnerLoop(0.1), score_fn=score_fn
    )
    assert grads.params["head.weight"] is None and grads.params["head.bias"] is None
    assert grads.params["body.block0.conv.weight"].shape == params["body.block0.conv.weight"].shape
    assert grads.inner_lr is None and grads.wrt == []
    assert 0 <= float(score) <= 1
    reference, expected_score = fmaml.meta_loss(
        loss_fn, frozen, tasks, fmaml.InnerLoop(0.1), score_fn=score_fn
    )
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(score, expected_score)


@pytest.mark.slow
def test_the_readme_library_example_runs_and_its_two_gradients_agree():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Library", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md (Library)", "exec"), namespace)
    # the fast way's gradients (the README's last call: ANIL, one task at a time,
    # recomputed) against the definition's
    grads = namespace["grads"]
    definition = fmaml.meta_loss(
        namespace["loss_fn"], namespace["params"], namespace["tasks"], namespace["anil"]
    )
    same = torch.autograd.grad(definition, list(namespace["params"].values()))
    # float32 and other kernels: compare the whole gradient (a conv bias before BatchNorm
    # has a gradient of zero in exact arithmetic, rounding noise here)
    a = torch.cat([g.flatten() for g in grads.params.values()])
    b = torch.cat([g.flatten() for g in same])
    assert (a - b).norm() <= 1e-3 * b.norm()
