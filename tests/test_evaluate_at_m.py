"""Best/Mean/Worst@M tables and seed confidence intervals: the numbers a reader of the mini reproduction trusts."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from scipy import stats

from dp2o.evaluate import (
    difference_vs,
    markdown_table,
    per_input_at_m,
    run_at_m,
    summarize_over_seeds,
    t_interval,
)


def _candidates():
    # two methods × two seeds × two inputs × three candidates; method "b" is method "a" shifted by +0.1
    rows = []
    for method, shift in (("a", 0.0), ("b", 0.1)):
        for seed in (0, 1):
            for sid, rewards in (("x", [0.2, 0.5, 0.8]), ("y", [0.4, 0.4, 0.1 + 0.1 * seed])):
                for cand, r in enumerate(rewards):
                    rows.append(
                        {
                            "method": method,
                            "train_seed": seed,
                            "sample_id": sid,
                            "candidate": cand,
                            "reward": r + shift,
                        }
                    )
    return pa.Table.from_pylist(rows)


def test_per_input_best_mean_worst_match_a_hand_computation():
    per = per_input_at_m(_candidates(), group_by=("method", "train_seed"))
    row = [r for r in per.to_pylist() if (r["method"], r["train_seed"], r["sample_id"]) == ("a", 1, "y")][0]
    assert row["best"] == pytest.approx(0.4)
    assert row["mean"] == pytest.approx((0.4 + 0.4 + 0.2) / 3)
    assert row["worst"] == pytest.approx(0.2)
    assert row["m"] == 3


def test_run_average_is_over_inputs():
    runs = run_at_m(
        per_input_at_m(_candidates(), group_by=("method", "train_seed")), group_by=("method", "train_seed")
    )
    a0 = [r for r in runs.to_pylist() if r["method"] == "a" and r["train_seed"] == 0][0]
    assert a0["best"] == pytest.approx((0.8 + 0.4) / 2)
    assert a0["worst"] == pytest.approx((0.2 + 0.1) / 2)
    assert a0["inputs"] == 2


def test_t_interval_matches_scipy_and_handles_degenerate_cases():
    values = [0.1, 0.3, 0.2, 0.6]
    mean, lo, hi = t_interval(values)
    ref_lo, ref_hi = stats.t.interval(0.95, df=3, loc=sum(values) / 4, scale=stats.sem(values))
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi))
    assert mean == pytest.approx(0.3)
    single = t_interval([0.5])
    assert single[0] == 0.5 and math.isnan(single[1]) and math.isnan(single[2])
    assert t_interval([0.2, 0.2, 0.2])[1:] == pytest.approx((0.2, 0.2))
    with pytest.raises(ValueError, match="no values"):
        t_interval([])


def test_paired_difference_of_a_constant_shift_is_that_shift_with_zero_width():
    per = per_input_at_m(_candidates(), group_by=("method", "train_seed"))
    runs = run_at_m(per, group_by=("method", "train_seed"))
    b = runs.filter(pa.compute.equal(runs["method"], "b"))
    a = runs.filter(pa.compute.equal(runs["method"], "a"))
    diff = difference_vs(b, a).to_pylist()[0]
    for s in ("best", "mean", "worst"):
        assert diff[s] == pytest.approx(0.1)
        assert diff[f"{s}_lo"] == pytest.approx(0.1) and diff[f"{s}_hi"] == pytest.approx(0.1)
    # the unpaired summary of "a" has seed-to-seed spread in Worst@M, so its interval is wider than zero
    summary = summarize_over_seeds(a).to_pylist()[0]
    assert summary["worst_hi"] - summary["worst_lo"] > 0.01
    assert summary["seeds"] == 2


def test_single_row_baseline_is_subtracted_from_every_seed():
    runs = pa.Table.from_pylist(
        [{"method": "dpo", "train_seed": s, "best": 0.5 + s, "mean": 0.4, "worst": 0.3} for s in (0, 1, 2)]
    )
    base = pa.Table.from_pylist([{"best": 0.5, "mean": 0.5, "worst": 0.5}])
    diff = difference_vs(runs, base).to_pylist()[0]
    assert diff["best"] == pytest.approx(1.0) and diff["mean"] == pytest.approx(-0.1)


def test_bad_tables_raise_errors_that_name_the_problem():
    with pytest.raises(ValueError, match="reward"):
        per_input_at_m(pa.table({"sample_id": ["x"], "score": [0.1]}))
    with pytest.raises(ValueError, match="NaN"):
        per_input_at_m(pa.table({"sample_id": ["x"], "reward": [float("nan")]}))
    runs = pa.Table.from_pylist(
        [{"method": "a", "train_seed": 0, "best": 1.0, "mean": 1.0, "worst": 1.0}] * 2
    )
    with pytest.raises(ValueError, match="repeated"):
        summarize_over_seeds(runs)
    with pytest.raises(ValueError, match="no row for train_seed=0"):
        difference_vs(
            runs.slice(0, 1),
            pa.Table.from_pylist([{"train_seed": 5, "best": 0.0, "mean": 0.0, "worst": 0.0}] * 2),
        )


def test_markdown_table_shows_value_and_interval():
    runs = pa.Table.from_pylist(
        [
            {"method": "dpo", "train_seed": s, "best": 0.5, "mean": 0.4 + 0.01 * s, "worst": 0.3}
            for s in range(3)
        ]
    )
    text = markdown_table(summarize_over_seeds(runs), digits=3)
    lines = text.strip().splitlines()
    assert lines[0] == "| method | seeds | Best@M | Mean@M | Worst@M |"
    assert lines[2].startswith("| dpo | 3 | 0.500 [0.500, 0.500] | 0.410 [")
