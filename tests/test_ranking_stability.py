"""scripts/piqe_stability.py measures what ranking needs: a shift's effect common to all candidates of an input
does not count against a metric, a shift that reorders candidates does."""

from __future__ import annotations

import numpy as np

from scripts.piqe_stability import SHIFTS, stability

N, M, W = 6, 16, 1 + len(SHIFTS)
PHOTOS = ["a", "b", "c"] * 2


def _base(rng) -> np.ndarray:
    quality = rng.normal(size=(N, M, 1))  # what the metric should rank
    return np.repeat(quality, W, axis=2) + rng.normal(scale=5.0, size=(N, 1, 1))  # plus an input's level


def test_a_common_shift_effect_leaves_the_ranking_stable():
    rng = np.random.default_rng(0)
    scores = _base(rng) + rng.normal(scale=3.0, size=(N, 1, W))  # every window moves the whole input
    result = stability(scores, PHOTOS)
    assert result["spearman"] == 1.0 and result["stable"]
    assert result["centred_shift_std"] < 1e-12
    assert result["uncentred_shift_std"] > result["between_candidate_std"]  # what the old measure looked at


def test_a_shift_that_reorders_candidates_is_unstable():
    rng = np.random.default_rng(1)
    scores = _base(rng) + rng.normal(scale=3.0, size=(N, M, W))  # per-candidate noise, 3x the spread
    result = stability(scores, PHOTOS)
    assert result["spearman"] < 0.5 and not result["stable"]
    assert result["shift_to_spread_ratio"] > 0.5  # the spread itself is mostly that noise here
    lo, hi = result["spearman_ci95_over_inputs"]
    assert lo <= result["spearman"] <= hi
    assert set(result["spearman_by_photo"]) == set(PHOTOS)
