"""Best@M / Mean@M / Worst@M of a per-candidate score, and their confidence intervals over training seeds.

Every function here is a pure function on pyarrow tables (one row per candidate, or one row per run), so the
same code serves a notebook, the mini reproduction and an evaluate stage.

The design choice a reader would miss: the 95 % interval is a Student-t interval over *training seeds* (one
number per seed: the @M statistic averaged over the held-out inputs), not over inputs or candidates. Inputs and
candidates are fixed across methods — every method sees the same LR images and the same sampling seeds — so
the variation that decides whether a method is better is the variation between training runs. Comparisons
against a baseline are paired by seed (`difference_vs`), which removes the shared input/candidate noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

AT_M_STATS = ("best", "mean", "worst")


def _require_columns(table: pa.Table, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{what}: table lacks column(s) {missing}; it has {table.column_names}")


def per_input_at_m(
    table: pa.Table, *, value: str = "reward", group_by: Sequence[str] = (), input_key: str = "sample_id"
) -> pa.Table:
    """Best/Mean/Worst@M of `value` per input.

    table: one row per candidate with `input_key`, `value` (float, higher is better) and the `group_by` columns
    (e.g. method, train_seed). Returns one row per (group_by..., input_key) with `best`, `mean`, `worst` and
    `m` (the number of candidates of that input).
    """
    keys = [*group_by, input_key]
    _require_columns(table, [*keys, value], "per_input_at_m")
    if table.num_rows == 0:
        raise ValueError("per_input_at_m: the table has no rows")
    if pc.any(pc.is_null(table[value])).as_py() or pc.any(pc.is_nan(table[value])).as_py():
        raise ValueError(f"per_input_at_m: column {value!r} has null/NaN values; drop or re-score those rows")
    out = table.group_by(keys, use_threads=False).aggregate(
        [(value, "max"), (value, "mean"), (value, "min"), (value, "count")]
    )
    return out.rename_columns(
        {f"{value}_max": "best", f"{value}_mean": "mean", f"{value}_min": "worst", f"{value}_count": "m"}
    ).select([*keys, "best", "mean", "worst", "m"])


def run_at_m(per_input: pa.Table, *, group_by: Sequence[str] = ()) -> pa.Table:
    """Average the per-input Best/Mean/Worst@M over inputs: one row per `group_by` combination (a run).

    per_input: the output of `per_input_at_m`. Returns `group_by` columns, `best`, `mean`, `worst`, `inputs`.
    """
    _require_columns(per_input, [*group_by, *AT_M_STATS], "run_at_m")
    out = per_input.group_by(list(group_by), use_threads=False).aggregate(
        [(s, "mean") for s in AT_M_STATS] + [("best", "count")]
    )
    return out.rename_columns({**{f"{s}_mean": s for s in AT_M_STATS}, "best_count": "inputs"}).select(
        [*group_by, *AT_M_STATS, "inputs"]
    )


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the Student-t confidence interval of the mean of `values`.

    With a single value the interval is undefined and (value, nan, nan) is returned; with identical values it
    has zero width.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval: no values")
    if not 0 < confidence < 1:
        raise ValueError(f"t_interval: confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def summarize_over_seeds(
    runs: pa.Table,
    *,
    group_by: Sequence[str] = ("method",),
    seed: str = "train_seed",
    confidence: float = 0.95,
) -> pa.Table:
    """Mean and t-interval over training seeds of each @M statistic.

    runs: one row per (group_by..., seed) with `best`, `mean`, `worst` (the output of `run_at_m`). Returns one
    row per `group_by` combination, in first-appearance order, with `seeds` and, for s in best/mean/worst,
    `s`, `s_lo`, `s_hi`.
    """
    _require_columns(runs, [*group_by, seed, *AT_M_STATS], "summarize_over_seeds")
    rows = runs.to_pylist()
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[g] for g in group_by), []).append(row)
    out = []
    for key, members in groups.items():
        seeds = [m[seed] for m in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"summarize_over_seeds: group {key} has repeated {seed!r} values {seeds}")
        rec = dict(zip(group_by, key, strict=True))
        rec["seeds"] = len(members)
        for s in AT_M_STATS:
            rec[s], rec[f"{s}_lo"], rec[f"{s}_hi"] = t_interval([m[s] for m in members], confidence)
        out.append(rec)
    return pa.Table.from_pylist(out)


def seed_differences(runs: pa.Table, baseline: pa.Table, *, seed: str = "train_seed") -> pa.Table:
    """`runs` with each @M statistic replaced by run − baseline, one row per run (not yet summarised).

    baseline: either one row per seed (paired by `seed`, e.g. ablations trained with the same seeds) or a single
    row without seed variation (a fixed base model), subtracted from every run.
    """
    _require_columns(baseline, list(AT_M_STATS), "seed_differences (baseline)")
    base_rows = baseline.to_pylist()
    if len(base_rows) == 1:
        base_of = {None: base_rows[0]}
    else:
        _require_columns(baseline, [seed], "seed_differences (baseline)")
        base_of = {row[seed]: row for row in base_rows}
    diffs = []
    for row in runs.to_pylist():
        key = None if len(base_rows) == 1 else row[seed]
        if key not in base_of:
            raise ValueError(f"seed_differences: baseline has no row for {seed}={row[seed]!r}")
        diffs.append({**row, **{s: row[s] - base_of[key][s] for s in AT_M_STATS}})
    return pa.Table.from_pylist(diffs, schema=runs.schema)


def difference_vs(
    runs: pa.Table,
    baseline: pa.Table,
    *,
    group_by: Sequence[str] = ("method",),
    seed: str = "train_seed",
    confidence: float = 0.95,
) -> pa.Table:
    """Per-seed differences of each @M statistic against a baseline (`seed_differences`), with t-intervals over
    seeds. Returns the `summarize_over_seeds` layout, where each value is a difference (run − baseline)."""
    return summarize_over_seeds(
        seed_differences(runs, baseline, seed=seed), group_by=group_by, seed=seed, confidence=confidence
    )


def markdown_table(
    summary: pa.Table,
    *,
    label_columns: Sequence[str] = ("method",),
    digits: int = 4,
    count: str = "seeds",
) -> str:
    """A markdown table of `summarize_over_seeds` output: `value [lo, hi]` per @M statistic. `count` names the
    column that says how many values each interval is over."""
    _require_columns(summary, [*label_columns, count, *AT_M_STATS], "markdown_table")
    head = [*label_columns, count, "Best@M", "Mean@M", "Worst@M"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary.to_pylist():
        cells = [str(row[c]) for c in label_columns] + [str(row[count])]
        for s in AT_M_STATS:
            lo, hi = row[f"{s}_lo"], row[f"{s}_hi"]
            ci = "" if math.isnan(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
            cells.append(f"{row[s]:.{digits}f}{ci}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
