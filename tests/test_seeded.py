"""Seeded initialisation without global random state (issue 11, item 5): the same weights as
torch.manual_seed(s) then the builder, the global generator untouched, safe from two threads."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import fmaml
from fmaml.nn.init import seeded

BUILDERS = {
    "mlp": lambda: fmaml.nn.mlp(hidden=(40, 40)),
    "conv4": lambda: fmaml.nn.conv4(5, 1, 8, 28),
    "conv4-max-pool": lambda: fmaml.nn.conv4(5, 3, 8, 84, max_pool=True),
}


def globally_seeded(make, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_weights_are_those_of_the_global_seed_and_the_global_state_is_untouched(name):
    before = torch.random.get_rng_state()
    model = seeded(BUILDERS[name], torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), before), "no global draw"
    assert_same(model, globally_seeded(BUILDERS[name], 7))
    other = seeded(BUILDERS[name], torch.Generator().manual_seed(8))
    assert not torch.equal(other.head.weight, model.head.weight)


def test_resnet12_draws_its_kaiming_normal_convolutions_from_the_generator():
    def make(generator=None):
        return fmaml.nn.resnet12(5, 3, (4, 10, 20, 40), generator=generator)

    before = torch.random.get_rng_state()
    model = make(torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert_same(model, globally_seeded(make, 3))


def test_two_threads_building_at_once_get_their_own_seeds():
    expected = {s: seeded(BUILDERS["conv4"], torch.Generator().manual_seed(s)) for s in (1, 2)}
    got: dict = {}
    barrier = threading.Barrier(2)

    def build(seed):
        barrier.wait()
        for _ in range(5):
            got[seed] = seeded(BUILDERS["conv4"], torch.Generator().manual_seed(seed))

    threads = [threading.Thread(target=build, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (1, 2):
        assert_same(got[s], expected[s])


def test_a_layer_of_unknown_initialisation_is_refused():
    with pytest.raises(TypeError, match=r"don't know how torch initialises LayerNorm"):
        seeded(lambda: nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), torch.Generator())


def test_building_a_run_leaves_the_global_random_state_alone():
    from fmaml.training.train import init_state

    before = torch.random.get_rng_state()
    state = init_state(fmaml.TrainConfig(dataset="sinusoid", meta_batch=2, hidden=8, seed=5))
    assert torch.equal(torch.random.get_rng_state(), before)
    again = init_state(fmaml.TrainConfig(dataset="sinusoid", meta_batch=2, hidden=8, seed=5))
    for k in state.params:
        assert torch.equal(state.params[k], again.params[k])
