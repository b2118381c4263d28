"""Guarantees of pair construction and HPO weights (dp2o.pairs.build_pairs).

The vectorised implementation is checked against `_loop_pairs`, a deliberately plain per-group loop written
straight from METHOD.md, on random data with many ties, groups of different sizes, too-small and zero-spread
groups and failed (NaN) scores.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from dp2o.pairs import build_pairs


def _loop_pairs(sample_id, candidate, reward, n_top, weighting):
    groups = defaultdict(list)
    for sid, c, r in zip(sample_id, candidate, reward, strict=True):
        groups[sid]
        if math.isfinite(r):
            groups[sid].append((int(c), float(r)))
    counts = {"too_small": 0, "zero_spread": 0}
    per_group = []
    for sid in sorted(groups):
        items = groups[sid]
        m = len(items)
        if m < 2 * n_top:
            counts["too_small"] += 1
            continue
        rewards = [r for _, r in items]
        if max(rewards) == min(rewards):
            counts["zero_spread"] += 1
            continue
        ranked = sorted(items, key=lambda cr: (-cr[1], cr[0]))
        pairs = [(w, lo) for w in ranked[:n_top] for lo in ranked[m - n_top :]]
        mu_gap = statistics.fmean(w[1] - lo[1] for w, lo in pairs)
        per_group.append((sid, m, statistics.pstdev(rewards), mu_gap, pairs))
    mu_sigma = statistics.fmean(g[2] for g in per_group) if per_group else float("nan")
    rows = []
    for sid, m, sigma, mu_gap, pairs in per_group:
        for (cw, rw), (cl, rl) in pairs:
            if weighting == "hpo":
                w_intra = abs(rw - rl) + (1 - mu_gap)
                w_inter = sigma + (1 - mu_sigma)
            else:
                w_intra = w_inter = 1.0
            rows.append((sid, cw, cl, rw, rl, w_intra, w_inter, w_intra * w_inter, sigma, m))
    return rows, counts, mu_sigma


def _random_scores(seed, n_groups=120, n_top=3):
    """Rows in random order; rewards on a 1/8 grid (many ties); some groups too small, some constant, some NaN."""
    rng = np.random.default_rng(seed)
    ids, cands, rewards = [], [], []
    for g in range(n_groups):
        m = int(rng.integers(1, 4 * n_top + 3))
        r = rng.integers(0, 9, size=m) / 8
        if g % 17 == 0:
            r[:] = r[0]
        if g % 11 == 0:
            r[rng.integers(0, m)] = np.nan
        c = rng.permutation(200)[:m]  # ids need not be 0..M-1
        ids += [f"img-{g:04d}"] * m
        cands += c.tolist()
        rewards += r.tolist()
    perm = rng.permutation(len(ids))
    return np.array(ids)[perm], np.array(cands)[perm], np.array(rewards)[perm]


@pytest.mark.parametrize("weighting", ["hpo", "uniform"])
@pytest.mark.parametrize("n_top", [1, 2, 3, 5])
def test_matches_a_plain_per_group_loop_on_random_data_with_ties(n_top, weighting):
    ids, cands, rewards = _random_scores(seed=n_top, n_top=n_top)
    table, stats = build_pairs(ids, cands, rewards, n_top=n_top, weighting=weighting)
    expected, counts, mu_sigma = _loop_pairs(ids, cands, rewards, n_top, weighting)

    assert table.num_rows == len(expected) == stats.pairs > 0
    cols = table.to_pydict()
    got = list(zip(*(cols[k] for k in ("sample_id", "win", "lose")), strict=True))
    assert got == [row[:3] for row in expected]
    for k, name in enumerate(("reward_win", "reward_lose", "w_intra", "w_inter", "weight", "group_sigma"), 3):
        np.testing.assert_allclose(cols[name], [row[k] for row in expected], rtol=0, atol=1e-12, err_msg=name)
    assert cols["group_m"] == [row[9] for row in expected]

    assert stats.groups == len(set(ids.tolist()))
    assert stats.groups_too_small == counts["too_small"] > 0
    assert stats.groups_zero_spread == counts["zero_spread"] > 0
    assert stats.groups_with_pairs == stats.groups - counts["too_small"] - counts["zero_spread"]
    assert stats.candidates_nonfinite == int(np.isnan(rewards).sum()) > 0
    tied = sum(row[3] == row[4] for row in expected)
    assert stats.pairs_tied == tied
    assert tied > 0 or n_top == 1  # with N=1 a tie would mean zero spread
    assert stats.mu_sigma == pytest.approx(mu_sigma, abs=1e-12)


def test_hpo_factors_and_weight_average_to_one():
    ids, cands, rewards = _random_scores(seed=7, n_top=4)
    table, _ = build_pairs(ids, cands, rewards, n_top=4, weighting="hpo")
    for name in ("w_intra", "w_inter", "weight"):
        assert np.mean(table[name].to_numpy()) == pytest.approx(1.0, abs=1e-12), name
    assert table["weight"].to_numpy().min() >= 0


def test_ranking_is_reward_descending_then_candidate_ascending():
    # candidates 3 and 1 tie for best, 0 and 4 tie for worst: winners are [1, 3], losers [0, 4] (last two)
    ids = ["a"] * 6
    cands = [0, 1, 2, 3, 4, 5]
    rewards = [0.1, 0.9, 0.5, 0.9, 0.1, 0.4]
    table, stats = build_pairs(ids, cands, rewards, n_top=2, weighting="uniform")
    pairs = list(zip(table["win"].to_pylist(), table["lose"].to_pylist(), strict=True))
    assert pairs == [(1, 0), (1, 4), (3, 0), (3, 4)]
    assert stats.pairs_tied == 0

    best_worst, _ = build_pairs(ids, cands, rewards, n_top=1, weighting="uniform")
    assert (best_worst["win"][0].as_py(), best_worst["lose"][0].as_py()) == (1, 4)


def test_hpo_weights_on_a_hand_computed_example():
    # group a: rewards 1, .5, 0, 0 → N=1 pair (best, worst), gap 1, μ_gap 1, σ = sqrt(0.171875)
    # group b: rewards .6, .6, .4, .4 → gap .2, μ_gap .2, σ = 0.1; μ_σ = (σ_a + σ_b) / 2
    ids = ["a"] * 4 + ["b"] * 4
    cands = [0, 1, 2, 3] * 2
    rewards = [1.0, 0.5, 0.0, 0.0, 0.6, 0.6, 0.4, 0.4]
    table, stats = build_pairs(ids, cands, rewards, n_top=1, weighting="hpo")
    sigma_a, sigma_b = math.sqrt(0.171875), 0.1
    mu_sigma = (sigma_a + sigma_b) / 2
    assert table["win"].to_pylist() == [0, 0]
    assert table["lose"].to_pylist() == [3, 3]
    np.testing.assert_allclose(table["w_intra"].to_numpy(), [1.0, 1.0])
    np.testing.assert_allclose(table["w_inter"].to_numpy(), [sigma_a + 1 - mu_sigma, sigma_b + 1 - mu_sigma])
    np.testing.assert_allclose(table["weight"].to_numpy(), [sigma_a + 1 - mu_sigma, sigma_b + 1 - mu_sigma])
    assert stats.mu_sigma == pytest.approx(mu_sigma)
    assert stats.mu_gap_mean == pytest.approx(0.6)


def test_output_does_not_depend_on_row_order_or_input_container():
    ids, cands, rewards = _random_scores(seed=3)
    ref, ref_stats = build_pairs(ids, cands, rewards, n_top=2, weighting="hpo")
    perm = np.random.default_rng(0).permutation(len(ids))
    chunked = pa.chunked_array([pa.array(ids[perm][:100]), pa.array(ids[perm][100:])])
    other, other_stats = build_pairs(
        chunked, pa.array(cands[perm]), pa.array(rewards[perm]), n_top=2, weighting="hpo"
    )
    assert other.equals(ref)
    assert other_stats == ref_stats
    # Parquet often reads ids back dictionary-encoded, possibly with unused dictionary entries
    dictionary = pa.DictionaryArray.from_arrays(
        pa.array(np.searchsorted(np.unique(ids), ids), pa.int32()), pa.array([*np.unique(ids), "unused"])
    )
    encoded, encoded_stats = build_pairs(dictionary, cands, rewards, n_top=2, weighting="hpo")
    assert encoded.equals(ref)
    assert encoded_stats == ref_stats


def test_integer_sample_ids_sort_numerically_and_keep_their_type():
    ids = np.array([10] * 2 + [9] * 2 + [100] * 2, dtype=np.int64)
    table, _ = build_pairs(ids, [0, 1] * 3, [0.2, 0.8] * 3, n_top=1, weighting="uniform")
    assert table["sample_id"].type == pa.int64()
    assert table["sample_id"].to_pylist() == [9, 10, 100]


def test_groups_of_different_sizes_each_use_their_own_bottom_n():
    ids = ["m4"] * 4 + ["m6"] * 6
    cands = list(range(4)) + list(range(6))
    rewards = [0.4, 0.3, 0.2, 0.1, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    table, _ = build_pairs(ids, cands, rewards, n_top=2, weighting="uniform")
    m6 = table.filter(pa.compute.equal(table["sample_id"], "m6"))
    assert sorted(set(m6["lose"].to_pylist())) == [4, 5]
    assert set(table["group_m"].to_pylist()) == {4, 6}


def test_no_group_with_pairs_gives_an_empty_table_and_nan_mu_sigma():
    table, stats = build_pairs(["a", "a", "b"], [0, 1, 0], [0.5, 0.5, 0.2], n_top=1, weighting="hpo")
    assert table.num_rows == 0
    assert "weight" in table.column_names
    assert (stats.groups_zero_spread, stats.groups_too_small, stats.groups_with_pairs) == (1, 1, 0)
    assert math.isnan(stats.mu_sigma)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((["a", "a"], [0, 0], [0.1, 0.2]), {}, "duplicated .*sample_id='a' candidate=0"),
        ((["b", "a", "b"], [2**62, 0, 2**62], [0.1, 0.2, 0.3]), {}, f"1 duplicated .*'b' candidate={2**62}"),
        ((["a", "a"], [0, 1], [0.1, 1.5]), {}, r"rewards in \[0, 1\]"),
        ((["a", "a"], [0, 1], [0.1]), {}, "lengths 2, 2, 1"),
        ((["a", "a"], [0.0, 1.0], [0.1, 0.2]), {}, "integer ids"),
        ((["a", "a"], [0, -1], [0.1, 0.2]), {}, "non-negative"),
        ((pa.array(["a", None]), [0, 1], [0.1, 0.2]), {}, "null"),
        ((["a", "a"], [0, 1], [0.1, 0.2]), {"n_top": 0}, "positive integer"),
        ((["a", "a"], [0, 1], [0.1, 0.2]), {"weighting": "dpo"}, "'hpo' or 'uniform'"),
    ],
)
def test_bad_input_is_refused_with_a_named_column(args, kwargs, match):
    options = {"n_top": 1, "weighting": "hpo", **kwargs}
    with pytest.raises(ValueError, match=match):
        build_pairs(*args, **options)


def test_uniform_weighting_accepts_rewards_outside_unit_interval():
    table, _ = build_pairs(["a", "a"], [0, 1], [-3.0, 7.0], n_top=1, weighting="uniform")
    assert table["win"].to_pylist() == [1]
    assert table["weight"].to_pylist() == [1.0]


def test_huge_candidate_ids_give_the_same_pairs():
    # ids this large cannot be packed into one int64 sort key, so the other sort path runs
    ids, cands, rewards = _random_scores(seed=5)
    small, small_stats = build_pairs(ids, cands, rewards, n_top=2, weighting="hpo")
    big, big_stats = build_pairs(ids, cands * 2**50, rewards, n_top=2, weighting="hpo")
    assert big["win"].to_pylist() == [c * 2**50 for c in small["win"].to_pylist()]
    assert big["lose"].to_pylist() == [c * 2**50 for c in small["lose"].to_pylist()]
    assert big.drop(["win", "lose"]).equals(small.drop(["win", "lose"]))
    assert big_stats == small_stats
