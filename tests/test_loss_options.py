"""A loss's options are declared (fmaml.types.LossOptions) and changed by building a new loss,
never set on the callable afterwards; the inner loop reads them with options_of."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fmaml
from fmaml.adapt import at_step
from fmaml.types import LossOptions, options_of


def test_changing_an_option_builds_a_new_loss_and_leaves_the_old_one_alone():
    loss_fn = fmaml.supervised_loss(fmaml.nn.conv4(3, hidden=4, image_size=12), F.cross_entropy)
    support = loss_fn.with_support_statistics()
    assert support is not loss_fn and support.module is loss_fn.module
    assert options_of(support) == LossOptions(support_statistics=True)
    assert options_of(loss_fn) == LossOptions()
    stepwise, _ = fmaml.per_step(
        support, fmaml.params_of(loss_fn.module), support.batchnorm_keys(), num_steps=3
    )
    assert options_of(stepwise).stepwise and options_of(stepwise).support_statistics
    assert set(stepwise.per_step_keys) == set(support.batchnorm_keys())
    with pytest.raises(AttributeError):
        loss_fn.stepwise = True  # declared, not stashed
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss_fn.options.stepwise = True  # type: ignore[misc]
    with pytest.raises(TypeError, match="expected an fmaml.types.LossOptions, got dict"):
        loss_fn.with_options({"stepwise": True})  # type: ignore[arg-type]


def test_any_callable_can_declare_options_and_the_inner_loop_reads_them():
    seen = []

    class Stepwise:
        options = LossOptions(stepwise=True)

        def __call__(self, params, batch, step=0):
            seen.append(step)
            return ((params["w"] - batch[0]) ** 2).sum()

    params = {"w": torch.zeros(2)}
    fmaml.unroll(Stepwise(), params, (torch.ones(2), None), fmaml.InnerLoop(0.1, num_steps=3))
    assert seen == [0, 1, 2]
    plain = lambda params, batch: params["w"].sum()  # noqa: E731
    assert options_of(plain) == LossOptions() and at_step(plain, 2) is plain
