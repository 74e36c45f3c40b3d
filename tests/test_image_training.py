"""Image-data training: exact resume with the episode sampler, and the config's checks."""

from __future__ import annotations

import pytest
import torch
from conftest_images import make_omniglot

from fmaml.training.config import TrainConfig, resolve
from fmaml.training.train import evaluate_state, train


def omniglot_config(root, **changes) -> TrainConfig:
    values = dict(
        dataset="omniglot",
        data_root=str(root),
        split="alphabet:0.5,0.25,0.25",
        ways=2,
        meta_batch=2,
        hidden=4,
        iterations=8,
        val_every=4,
        val_episodes=4,
        checkpoint_every=4,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.mark.parametrize("algorithm", ["maml", "mamlpp"])
@pytest.mark.slow
def test_image_run_resumes_exactly(tmp_path, isolated_cache, algorithm):
    make_omniglot(tmp_path / "omni", {f"A{i}": 3 for i in range(4)}, images_per_character=4)
    config = omniglot_config(tmp_path / "omni", algorithm=algorithm, inner_steps=2)
    whole = train(config, tmp_path / "whole")
    train(config, tmp_path / "parts", iterations=4)
    resumed = train(None, tmp_path / "parts", resume=True)
    for a, b in zip(whole.leaves(), resumed.leaves()):
        assert torch.equal(a, b)
    assert torch.equal(whole.generator.get_state(), resumed.generator.get_state())


def test_evaluation_with_other_shots_keeps_the_run_settings(tmp_path, isolated_cache):
    make_omniglot(tmp_path / "omni", {f"A{i}": 3 for i in range(4)}, images_per_character=6)
    state = train(
        omniglot_config(tmp_path / "omni", algorithm="mamlpp", inner_steps=2), tmp_path / "run"
    )
    report = evaluate_state(state, num_episodes=6, shots=2, query=3, num_steps=4)
    assert report["shots"] == 2 and report["query_per_class"] == 3
    assert len(report["steps"]) == 5
    assert all(0.0 <= s["mean"] <= 1.0 for s in report["steps"])


@pytest.mark.parametrize("ways", [0, -3])
def test_non_positive_ways_is_refused(ways):
    with pytest.raises(ValueError, match=f"--ways must be a positive integer, got {ways}"):
        resolve(TrainConfig(dataset="omniglot", ways=ways))


def test_one_way_classification_is_refused():
    with pytest.raises(ValueError, match="--ways must be at least 2 for classification, got 1"):
        resolve(TrainConfig(dataset="omniglot", ways=1))


def _test_images(root, **changes) -> torch.Tensor:
    from fmaml.training.train import build_problem

    problem = build_problem(resolve(omniglot_config(root, **changes)))
    (task,) = problem.episodes("test", 4, 7, 4)
    return task.query[0]


def test_the_split_depends_on_split_seed_not_on_the_training_seed(tmp_path, isolated_cache):
    make_omniglot(tmp_path / "omni", {f"A{i}": 2 for i in range(8)}, images_per_character=2)
    root = tmp_path / "omni"
    reference = _test_images(root, seed=0)
    assert torch.equal(_test_images(root, seed=1), reference)  # same test alphabets
    assert not all(  # the split seed does choose them
        torch.equal(_test_images(root, split_seed=s), reference) for s in (1, 2, 3)
    )


def test_checkpoints_saved_before_split_seed_keep_their_split():
    saved = resolve(TrainConfig(dataset="omniglot", seed=3)).to_dict()
    del saved["split_seed"]  # as written by fmaml before split_seed existed
    assert TrainConfig.from_dict(saved).split_seed == 3
    assert TrainConfig.from_dict({**saved, "split_seed": 0}).split_seed == 0
