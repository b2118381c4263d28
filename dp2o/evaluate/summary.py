"""Best/Mean/Worst@M summaries of evaluation candidates: per model, statistic and @M, the mean over inputs with
a t-interval over inputs and over sources (photos), and paired differences to a baseline model; as a table
and as markdown that names the unit of every interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from dp2o.schemas import Column, documented_schema

#: the @M statistics, in table order
AT_M = ("best", "mean", "worst")
#: name of a difference row in the summary: `<model>-<baseline>`, e.g. `tuned-base`
BASELINE = "base"


#: docs of summary.parquet: one row per (model or difference, statistic, Best/Mean/Worst@M)
SUMMARY_COLUMNS = {
    "model": Column("base, tuned, or a paired difference such as tuned-base"),
    "statistic": Column("what is summarised: reward or one raw metric"),
    "higher_better": Column("a higher value of the statistic is better"),
    "at_m": Column("Best@M, Mean@M or Worst@M: max, mean or min over the M candidates of an input"),
    "inputs": Column("held-out inputs the value averages over"),
    "value": Column("mean over inputs of the per-input at_m value"),
    "lo": Column("lower end of the t-interval over inputs"),
    "hi": Column("upper end of the t-interval over inputs"),
    "sources": Column("distinct source photos the inputs come from"),
    "value_by_source": Column("mean over photos of the per-photo mean (the photo as the unit)"),
    "lo_by_source": Column("lower end of the t-interval over photos"),
    "hi_by_source": Column("upper end of the t-interval over photos"),
}


def _per_input(table, statistic: str, higher_better: bool, model_col: str, model: str) -> dict:
    """sample_id -> (source, best, mean, worst) of `statistic` over the model's finite candidates."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from dp2o.evaluate.at_m import per_input_at_m

    t = table.filter(pc.equal(table[model_col], model))
    v = t[statistic].to_numpy(zero_copy_only=False).astype(np.float64)
    keep = np.isfinite(v)
    if not keep.any():
        return {}
    sign = 1.0 if higher_better else -1.0
    t = t.filter(pa.array(keep)).append_column("_v", pa.array(sign * v[keep]))
    per = per_input_at_m(t, value="_v", group_by=("source",)).to_pylist()
    # for a lower-is-better metric, Best@M is the smallest raw value: max of the negated values, negated back
    return {r["sample_id"]: (r["source"], *(sign * r[s] for s in AT_M)) for r in per}


def _interval_row(per: dict, confidence: float) -> list[dict]:
    """One summary record per @M statistic from {sample_id: (source, best, mean, worst)}."""
    from dp2o.evaluate.at_m import t_interval

    by_source: dict[str, list[tuple]] = {}
    for row in per.values():
        by_source.setdefault(row[0], []).append(row)
    out = []
    for k, s in enumerate(AT_M, start=1):
        value, lo, hi = t_interval([r[k] for r in per.values()], confidence)
        means = [sum(r[k] for r in rows) / len(rows) for rows in by_source.values()]
        sv, slo, shi = t_interval(means, confidence) if len(means) >= 2 else (math.nan, math.nan, math.nan)
        out.append(
            {
                "at_m": s,
                "inputs": len(per),
                "value": value,
                "lo": lo,
                "hi": hi,
                "sources": len(by_source),
                "value_by_source": sv,
                "lo_by_source": slo,
                "hi_by_source": shi,
            }
        )
    return out


def at_m_summary(
    candidates,
    statistics: Mapping[str, bool],
    *,
    baseline: str | None = BASELINE,
    confidence: float = 0.95,
    model: str = "model",
):
    """Best/Mean/Worst@M per model and statistic, with t-intervals over inputs and over sources (photos).

    candidates: one row per candidate with `model`, `sample_id`, `source` and the statistic columns (non-finite
    values, e.g. FR metrics of an input without HR, are left out). statistics: {column: higher_is_better};
    Best@M of a lower-is-better metric is its smallest value. baseline: for every other model, add rows
    `<model>-<baseline>` of the per-input differences (paired: inputs both models have).
    Returns one row per (model, statistic, at_m) with `inputs`, `value` (mean over inputs), `lo`, `hi`
    (t-interval over inputs) and `sources`, `value_by_source` (mean of per-source means), `lo_by_source`,
    `hi_by_source` (t-interval over sources; NaN with fewer than two sources).
    """
    import pyarrow as pa

    models = list(dict.fromkeys(candidates[model].to_pylist()))
    records = []
    for stat, higher in statistics.items():
        per = {mdl: _per_input(candidates, stat, higher, model, mdl) for mdl in models}
        labelled = [(mdl, per[mdl]) for mdl in models]
        if baseline in per:
            for mdl in models:
                if mdl != baseline:
                    base = per[baseline]
                    diff = {
                        sid: (row[0], *(a - b for a, b in zip(row[1:], base[sid][1:], strict=True)))
                        for sid, row in per[mdl].items()
                        if sid in base
                    }
                    labelled.append((f"{mdl}-{baseline}", diff))
        for label, rows in labelled:
            if rows:
                for rec in _interval_row(rows, confidence):
                    records.append({"model": label, "statistic": stat, "higher_better": higher, **rec})
    schema = documented_schema(
        "evaluate",
        [
            ("model", pa.string()),
            ("statistic", pa.string()),
            ("higher_better", pa.bool_()),
            ("at_m", pa.string()),
            ("inputs", pa.int64()),
            ("value", pa.float64()),
            ("lo", pa.float64()),
            ("hi", pa.float64()),
            ("sources", pa.int64()),
            ("value_by_source", pa.float64()),
            ("lo_by_source", pa.float64()),
            ("hi_by_source", pa.float64()),
        ],
        SUMMARY_COLUMNS,
    )
    return pa.Table.from_pylist(records, schema=schema)


def _cell(value: float, lo: float, hi: float, digits: int) -> str:
    ci = "" if math.isnan(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{value:.{digits}f}{ci}"


def _table(rows: list[dict], labels: Sequence[str], by_source: bool, digits: int) -> list[str]:
    """Markdown rows: one line per (labels...) with Best/Mean/Worst@M cells."""
    count = "sources" if by_source else "inputs"
    suffix = "_by_source" if by_source else ""
    grouped: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        grouped.setdefault(tuple(r[c] for c in labels), {})[r["at_m"]] = r
    head = [*labels, "photos" if by_source else "inputs", "Best@M", "Mean@M", "Worst@M"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, stats in grouped.items():
        first = next(iter(stats.values()))
        cells = [str(x) for x in key] + [str(first[count])]
        for s in AT_M:
            r = stats.get(s)
            cells.append(_cell(r[f"value{suffix}"], r[f"lo{suffix}"], r[f"hi{suffix}"], digits) if r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_markdown(
    summary, *, confidence: float = 0.95, header: Sequence[str] = (), digits: int = 4
) -> str:
    """Markdown of an `at_m_summary` table: the reward over inputs (and over photos when there are several),
    then every raw metric over inputs. Each table's heading names the unit of its intervals."""
    rows = summary.to_pylist()
    level = f"{confidence:.0%}"
    lines = ["# Evaluation: Best/Mean/Worst@M", "", *header]
    reward = [r for r in rows if r["statistic"] == "reward"]
    if reward:
        n = max(r["inputs"] for r in reward)
        k = max(r["sources"] for r in reward)
        lines += [
            "",
            f"## Reward: mean over inputs, {level} t-interval over {n} inputs",
            "",
            *_table(reward, ["model"], False, digits),
        ]
        if k >= 2 and k < n:
            lines += [
                "",
                f"## Reward by photo: mean of the per-photo means, {level} t-interval over {k} photos",
                "",
                *_table(reward, ["model"], True, digits),
            ]
    raw = [r for r in rows if r["statistic"] != "reward"]
    if raw:
        for r in raw:
            r["better"] = "higher" if r["higher_better"] else "lower"
        n = max(r["inputs"] for r in raw)
        lines += [
            "",
            f"## Raw metrics: mean over inputs, {level} t-interval over the inputs in column `inputs` "
            f"(up to {n}; FR metrics only over inputs with HR)",
            "",
            *_table(raw, ["statistic", "better", "model"], False, digits),
        ]
    lines += [
        "",
        "Best@M / Worst@M: the best / worst of an input's M candidates (for a lower-is-better metric, the "
        "smallest / largest value); Mean@M: their mean. `<model>-base` rows are differences paired per input.",
    ]
    return "\n".join(lines) + "\n"
