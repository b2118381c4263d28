"""Evaluation rewards on a frozen scale: the same image gets the same reward whatever else is scored with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dp2o.evaluate.scoring import RewardModel


def _images(seed: int, n: int, m: int, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(n, 3, size, size, generator=g)
    noise = torch.randn(n, m, 3, size, size, generator=g) * torch.linspace(0.02, 0.3, m).reshape(
        1, m, 1, 1, 1
    )
    return hr, (hr[:, None] + noise).clamp(0, 1)


def test_raw_table_has_one_row_per_candidate_and_follows_noise_level():
    model = RewardModel(["psnr", "gmsd"], batch_size=4)
    hr, cands = _images(0, 2, 3)
    raw = model.raw(["a", "b"], cands, (hr * 255).round().byte())
    assert raw.column_names == ["sample_id", "candidate", "psnr", "gmsd"]
    assert raw["sample_id"].to_pylist() == ["a"] * 3 + ["b"] * 3
    assert raw["candidate"].to_pylist() == [0, 1, 2, 0, 1, 2]
    psnr = np.asarray(raw["psnr"]).reshape(2, 3)
    assert (np.diff(psnr, axis=1) < 0).all(), "more noise must give lower PSNR"


def test_bounds_are_fitted_once_then_frozen():
    model = RewardModel(["psnr", "gmsd"], batch_size=4)
    hr, cands = _images(1, 3, 4)
    first = model.reward(model.raw(["a", "b", "c"], cands, hr))
    bounds = model.bounds
    # re-scoring the first input alone keeps its rewards: the scale does not move with the pool
    again = model.reward(model.raw(["a"], cands[:1], hr[:1]))
    assert model.bounds is bounds
    np.testing.assert_allclose(np.asarray(again["reward"]), np.asarray(first["reward"])[:4], atol=1e-12)
    rewards = np.asarray(first["reward"]).reshape(3, 4)
    assert rewards.min() >= 0 and rewards.max() <= 1
    assert (rewards[:, 0] > rewards[:, -1]).all(), "the least noisy candidate must get the higher reward"


def test_mismatched_shapes_name_the_arguments():
    model = RewardModel(["psnr"], batch_size=2)
    hr, cands = _images(2, 2, 2)
    with pytest.raises(ValueError, match="ids, candidates"):
        model.raw(["a"], cands, hr)
