"""Guarantees of the hybrid reward (dp2o.reward.compute_reward / RewardConfig)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from dp2o.reward import METRICS, RewardConfig, compute_reward

LPIPS, PSNR, PIQE, ENTROPY = (METRICS[n] for n in ("lpips", "psnr", "piqe", "entropy"))
MINMAX = RewardConfig(clip_percentiles=(0.0, 100.0))


def _table(**columns):
    n = len(next(iter(columns.values())))
    columns.setdefault("sample_id", ["a"] * n)
    return pa.table(columns)


def test_hand_computed_reward_flips_lower_better_metrics():
    table = _table(lpips=[0.1, 0.3, 0.5], piqe=[20.0, 60.0, 40.0])
    reward, info = compute_reward(table, [LPIPS, PIQE], MINMAX)
    # lpips (lower better): 0.1 → 1, 0.3 → 0.5, 0.5 → 0; piqe (lower better): 20 → 1, 60 → 0, 40 → 0.5
    np.testing.assert_allclose(reward, [1.0, 0.25, 0.25])
    assert info["metrics"]["lpips"] == {
        "raw_at_0": 0.5,
        "raw_at_1": 0.1,
        "lower_better": True,
        "degenerate": False,
    }
    json.dumps(info)  # bounds are plain JSON, to be stored next to the scores


def test_fr_weight_and_metric_weights():
    table = _table(psnr=[20.0, 30.0], lpips=[0.2, 0.4], entropy=[7.0, 6.0])
    cfg = RewardConfig(clip_percentiles=(0.0, 100.0), fr_weight=0.8, metric_weights={"lpips": 3.0})
    reward, _ = compute_reward(table, [PSNR, LPIPS, ENTROPY], cfg)
    fr = np.array([(0.0 + 3 * 1.0) / 4, (1.0 + 3 * 0.0) / 4])
    nr = np.array([1.0, 0.0])
    np.testing.assert_allclose(reward, 0.8 * fr + 0.2 * nr)

    dropped, _ = compute_reward(
        table, [PSNR, LPIPS, ENTROPY], cfg.model_copy(update={"metric_weights": {"lpips": 0}})
    )
    np.testing.assert_allclose(dropped, 0.8 * np.array([0.0, 1.0]) + 0.2 * nr)


def test_only_fr_or_only_nr_metrics_use_that_mean_alone():
    table = _table(psnr=[10.0, 20.0, 40.0], lpips=[0.5, 0.3, 0.1])
    reward, _ = compute_reward(table, [PSNR, LPIPS], MINMAX.model_copy(update={"fr_weight": 0.1}))
    np.testing.assert_allclose(reward, [0.0, (1 / 3 + 0.5) / 2, 1.0])


def test_percentile_bounds_clip_outliers_to_the_ends():
    rng = np.random.default_rng(0)
    psnr = np.concatenate([rng.normal(25, 1, 998), [5.0, 60.0]])
    reward, info = compute_reward(_table(psnr=psnr), [PSNR], RewardConfig(clip_percentiles=(1.0, 99.0)))
    lo, hi = np.percentile(psnr, [1, 99])
    assert info["metrics"]["psnr"]["raw_at_0"] == pytest.approx(lo)
    assert info["metrics"]["psnr"]["raw_at_1"] == pytest.approx(hi)
    np.testing.assert_allclose(reward, np.clip((psnr - lo) / (hi - lo), 0, 1))
    assert reward[-2] == 0.0 and reward[-1] == 1.0
    assert reward.min() >= 0 and reward.max() <= 1


def test_group_pool_matches_a_per_group_loop():
    rng = np.random.default_rng(1)
    ids = np.repeat([f"g{i}" for i in range(40)], 9)
    psnr = rng.normal(25, 3, ids.size)
    piqe = rng.uniform(10, 90, ids.size)
    psnr[5] = np.nan
    piqe[18:27] = 50.0  # group g2: piqe is constant
    table = _table(sample_id=ids, psnr=psnr, piqe=piqe)
    cfg = RewardConfig(normalization="group", clip_percentiles=(10.0, 90.0))
    reward, info = compute_reward(table, [PSNR, PIQE], cfg)

    expected = np.empty(ids.size)
    for g in np.unique(ids):
        rows = ids == g
        parts = []
        for values in (psnr[rows], -piqe[rows]):
            lo, hi = np.nanpercentile(values, [10, 90])
            parts.append(np.clip((values - lo) / (hi - lo), 0, 1) if hi > lo else np.full(values.shape, 0.5))
        expected[rows] = 0.5 * parts[0] + 0.5 * parts[1]
    np.testing.assert_allclose(reward, expected, equal_nan=True)
    assert np.isnan(reward[5]) and np.isfinite(np.delete(reward, 5)).all()
    assert info["metrics"]["piqe"]["degenerate_groups"] == 1
    assert info["groups"] == 40


def test_degenerate_pool_gives_one_half_and_saturates_outliers():
    table = _table(piqe=[30.0] * 98 + [10.0, 90.0], psnr=np.linspace(10, 20, 100))
    reward, info = compute_reward(table, [PIQE], RewardConfig(clip_percentiles=(5.0, 95.0)))
    assert info["metrics"]["piqe"]["degenerate"]
    assert set(reward[:98]) == {0.5}
    assert (reward[98], reward[99]) == (1.0, 0.0)  # piqe is lower-better: 10 is above the pool, 90 below


def test_nan_scores_give_nan_rewards_and_infinite_scores_saturate():
    table = _table(psnr=[10.0, math.nan, math.inf, 20.0, 15.0])
    reward, _ = compute_reward(table, [PSNR], MINMAX)
    np.testing.assert_array_equal(reward, [0.0, np.nan, 1.0, 1.0, 0.5])


def test_bounds_reapply_to_new_rows_and_reproduce_the_original():
    train = _table(psnr=[20.0, 25.0, 30.0], lpips=[0.4, 0.2, 0.1])
    reward, bounds = compute_reward(train, [PSNR, LPIPS], MINMAX)
    again, _ = compute_reward(train, [PSNR, LPIPS], MINMAX, bounds=json.loads(json.dumps(bounds)))
    np.testing.assert_array_equal(again, reward)

    test = _table(psnr=[22.5, 40.0], lpips=[0.25, 0.5])
    reward_test, _ = compute_reward(test, [PSNR, LPIPS], MINMAX, bounds=bounds)
    np.testing.assert_allclose(reward_test, [0.5 * 0.25 + 0.5 * 0.5, 0.5 * 1.0 + 0.5 * 0.0])


@pytest.mark.parametrize(
    "table, specs, cfg, kwargs, match",
    [
        (_table(psnr=[1.0]), [LPIPS], MINMAX, {}, "no column 'lpips'"),
        (pa.table({"psnr": [1.0]}), [PSNR], MINMAX, {}, "no 'sample_id' column"),
        (
            _table(psnr=[1.0]),
            [PSNR],
            RewardConfig(metric_weights={"lpips": 1.0}),
            {},
            "not among the reward's",
        ),
        (
            _table(psnr=[1.0], piqe=[2.0]),
            [PSNR, PIQE],
            RewardConfig(metric_weights={"psnr": 0}),
            {},
            "total weight of 0",
        ),
        (
            _table(psnr=[1.0]),
            [PSNR],
            RewardConfig(normalization="group"),
            {"bounds": {}},
            "needs normalization='dataset'",
        ),
        (_table(psnr=[1.0]), [PSNR], MINMAX, {"bounds": {"metrics": {}}}, "no entry for metric 'psnr'"),
        (_table(psnr=[math.nan]), [PSNR], MINMAX, {}, "no finite score"),
        (_table(psnr=["x"]), [PSNR], MINMAX, {}, "must be numeric"),
    ],
)
def test_bad_tables_and_configs_are_refused(table, specs, cfg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_reward(table, specs, cfg, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_percentiles": (50.0, 50.0)},
        {"clip_percentiles": (-1.0, 99.0)},
        {"fr_weight": 1.5},
        {"metric_weights": {"psnr": -1.0}},
        {"normalisation": "group"},
    ],
)
def test_reward_config_rejects_bad_values(kwargs):
    with pytest.raises(ValidationError):
        RewardConfig(**kwargs)


def test_reward_config_is_frozen():
    with pytest.raises(ValidationError):
        RewardConfig().fr_weight = 0.3
