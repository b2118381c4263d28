"""The hybrid reward: raw IQA scores → per-metric [0, 1] scores → one reward per candidate.

R = fr_weight · mean(s̄ over FR metrics) + (1 − fr_weight) · mean(s̄ over NR metrics), where s̄ is a metric's
score turned higher-is-better and min–max normalised over a pool (the whole dataset, or the M candidates of
one input), with the pool's bounds taken at percentiles so a few outliers do not squash everyone else.

`compute_reward` is a pure function of the stored raw columns, so changing the weights or the normalisation
never re-runs a metric; with `bounds=` it re-applies the dataset bounds of an earlier run (e.g. training's)
to new rows, which keeps evaluation rewards comparable across models.

The design choice a reader might miss: a normalised score is *clipped*, not just scaled. With percentile
bounds some raw scores fall outside [lo, hi]; they map to 0 or 1. Degenerate pools (hi == lo, e.g. one
metric constant over a group) give 0.5 to scores equal to the bound, 1 above, 0 below: the metric then
carries no ranking information rather than an arbitrary one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dp2o.reward.registry import MetricSpec, unknown_metric_names


class RewardConfig(BaseModel):
    """How raw scores become the hybrid reward (see docs/reward.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    normalization: Literal["dataset", "group"] = Field(
        "dataset", description="min–max pool: every row of the table, or the candidates of one sample_id"
    )
    clip_percentiles: tuple[float, float] = Field(
        (1.0, 99.0), description="pool percentiles used as the min and max; (0, 100) is plain min–max"
    )
    fr_weight: float = Field(0.5, ge=0.0, le=1.0, description="share of the FR mean in R (NR gets the rest)")
    metric_weights: dict[str, float] = Field(
        {},
        description="per-metric weight inside its FR or NR mean; unlisted metrics weigh 1",
    )

    @field_validator("clip_percentiles")
    @classmethod
    def _percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {value}")
        return value

    @field_validator("metric_weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = unknown_metric_names(list(value))
        if unknown:
            raise ValueError(
                f"metric_weights names unknown metric(s) {', '.join(unknown)}; keys are metric names "
                "(see dp2o.reward.registry.METRICS)"
            )
        negative = {k: v for k, v in value.items() if not v >= 0}
        if negative:
            raise ValueError(f"metric_weights must be >= 0, got {negative}")
        return value


def _normalise(values: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
    """Map higher-is-better `values` to [0, 1] with bounds lo ≤ hi (scalars or per-row arrays)."""
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), values.shape)
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), values.shape)
    span = hi - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.clip((values - lo) / np.where(span > 0, span, 1.0), 0.0, 1.0)
    flat = np.where(values > hi, 1.0, np.where(values < lo, 0.0, 0.5))
    out = np.where(span > 0, scaled, flat)
    return np.where(np.isnan(values) | np.isnan(lo) | np.isnan(hi), np.nan, out)


def _group_percentiles(group: np.ndarray, values: np.ndarray, n_groups: int, q: float) -> np.ndarray:
    """Per-group percentile (numpy's default linear interpolation) of the finite values; NaN for empty groups."""
    finite = np.isfinite(values)
    g, v = group[finite], values[finite]
    order = np.lexsort((v, g))
    g, v = g[order], v[order]
    count = np.bincount(g, minlength=n_groups)
    start = np.cumsum(count) - count
    out = np.full(n_groups, np.nan)
    has = count > 0
    pos = (count[has] - 1) * (q / 100.0)
    below = np.floor(pos).astype(np.int64)
    above = np.minimum(below + 1, count[has] - 1)
    frac = pos - below
    v_below, v_above = v[start[has] + below], v[start[has] + above]
    out[has] = v_below + frac * (v_above - v_below)
    return out


def _raw_column(table: pa.Table, spec: MetricSpec) -> np.ndarray:
    if spec.name not in table.column_names:
        raise ValueError(
            f"score table has no column {spec.name!r} for metric {spec.name}; columns: {table.column_names}. "
            "Score with this metric first, or drop it from the reward's metrics"
        )
    column = table.column(spec.name)
    if not pa.types.is_floating(column.type) and not pa.types.is_integer(column.type):
        raise ValueError(f"score column {spec.name!r} must be numeric, got {column.type}")
    return column.to_numpy(zero_copy_only=False).astype(np.float64)


def _weighted_mean(parts: list[tuple[np.ndarray, float]], label: str) -> np.ndarray:
    total = sum(w for _, w in parts)
    if total <= 0:
        raise ValueError(
            f"metric_weights give the {label} metrics a total weight of 0; raise one of them above 0"
        )
    return sum(w * s for s, w in parts) / total


def compute_reward(
    table: pa.Table,
    specs: Sequence[MetricSpec],
    cfg: RewardConfig,
    *,
    bounds: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Hybrid reward per row of a score table, and the normalisation bounds that produced it.

    table:  needs `sample_id` and one raw-score column per spec (named `spec.name`); other columns ignored
    specs:  the metrics in the reward; each spec's kind decides FR or NR, lower_better decides the flip
    cfg:    normalisation and weights
    bounds: the `bounds` dict returned by an earlier dataset-pool call; its per-metric bounds are applied
            instead of computing them from this table (only with normalization="dataset")

    Returns (reward float64 [rows] in [0, 1], bounds). A row whose raw score is NaN for any used metric gets
    reward NaN (a failed candidate); ±inf raw scores are valid and saturate at 0 or 1. If only FR or only NR
    metrics are given, R is that mean alone and `fr_weight` has no effect.

    bounds (dataset pool): {"normalization": "dataset", "clip_percentiles": [lo, hi], "metrics": {name:
    {"raw_at_0": x, "raw_at_1": y, "lower_better": b}}}; raw_at_0 / raw_at_1 are the raw scores that map to
    0 and 1, in the metric's own units. Group pool: per-metric counts of groups whose bounds were degenerate.
    """
    if not specs:
        raise ValueError("compute_reward needs at least one metric")
    names = [s.name for s in specs]
    unknown = sorted(set(cfg.metric_weights) - set(names))
    if unknown:
        raise ValueError(f"metric_weights names {unknown}, which are not among the reward's metrics {names}")
    if bounds is not None and cfg.normalization != "dataset":
        raise ValueError("bounds= re-applies dataset-pool bounds; it needs normalization='dataset'")
    if "sample_id" not in table.column_names:
        raise ValueError(f"score table has no 'sample_id' column; columns: {table.column_names}")

    p_lo, p_hi = cfg.clip_percentiles
    info: dict[str, Any] = {
        "normalization": cfg.normalization,
        "clip_percentiles": [p_lo, p_hi],
        "metrics": {},
    }
    if cfg.normalization == "group":
        encoded = table.column("sample_id").combine_chunks().dictionary_encode()
        group = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        n_groups = len(encoded.dictionary)
        info["groups"] = n_groups

    normalised: dict[str, np.ndarray] = {}
    for spec in specs:
        sign = -1.0 if spec.lower_better else 1.0
        values = sign * _raw_column(table, spec)
        if cfg.normalization == "dataset":
            if bounds is not None:
                known = bounds.get("metrics", {})
                if spec.name not in known:
                    raise ValueError(
                        f"bounds has no entry for metric {spec.name!r}; it holds {sorted(known)}"
                    )
                lo, hi = sign * known[spec.name]["raw_at_0"], sign * known[spec.name]["raw_at_1"]
            else:
                finite = values[np.isfinite(values)]
                if finite.size == 0:
                    raise ValueError(f"metric {spec.name!r} has no finite score in the table")
                lo, hi = (float(x) for x in np.percentile(finite, [p_lo, p_hi]))
            info["metrics"][spec.name] = {
                "raw_at_0": sign * lo,
                "raw_at_1": sign * hi,
                "lower_better": spec.lower_better,
                "degenerate": hi <= lo,
            }
            normalised[spec.name] = _normalise(values, lo, hi)
        else:
            lo_g = _group_percentiles(group, values, n_groups, p_lo)
            hi_g = _group_percentiles(group, values, n_groups, p_hi)
            info["metrics"][spec.name] = {
                "lower_better": spec.lower_better,
                "degenerate_groups": int(np.count_nonzero(hi_g <= lo_g)),
            }
            normalised[spec.name] = _normalise(values, lo_g[group], hi_g[group])

    weight = {s.name: float(cfg.metric_weights.get(s.name, 1.0)) for s in specs}
    fr = [(normalised[s.name], weight[s.name]) for s in specs if s.kind == "FR"]
    nr = [(normalised[s.name], weight[s.name]) for s in specs if s.kind == "NR"]
    if fr and nr:
        reward = cfg.fr_weight * _weighted_mean(fr, "FR") + (1.0 - cfg.fr_weight) * _weighted_mean(nr, "NR")
    else:
        reward = _weighted_mean(fr, "FR") if fr else _weighted_mean(nr, "NR")
    return np.asarray(reward, dtype=np.float64), info
