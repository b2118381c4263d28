"""Plain-data descriptions of a finished stage, for an orchestrator to show (the Prefect flows turn them into
artifacts in `flows/artifacts.py`).

A stage's optional `Stage.describe(manifest, url, storage)` returns a list of dicts, each one of:

    {"kind": "table",    "key": "reward-histogram", "rows": [{...}, ...], "description": "..."}
    {"kind": "markdown", "key": "train-curve",      "markdown": "...",    "description": "..."}
    {"kind": "link",     "key": "model",            "link": "URL",        "text": "...", "description": "..."}

`key` is the description's own suffix (lowercase letters, digits, dashes); the orchestrator makes it unique
per stage folder. Everything here is plain Python data built from the stage's files, so `dp2o` stays free of
any orchestrator; the helpers below are shared by the stages' `describe` functions.

Pictures are SVG charts (`dp2o.charts`) embedded as data-URI images in markdown descriptions: Prefect's UI
renders them (checked in a real browser by tests/test_ui_browser.py), they need no file server, and they work
offline and whatever storage (local, S3) the run used. Text forms (tables, a unicode sparkline) stay beside them
for plain markdown viewers and logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: the eight block characters of a sparkline, lowest first
SPARK = "▁▂▃▄▅▆▇█"
BAR = "█"


def table(key: str, rows: list[dict[str, Any]], description: str = "") -> dict:
    return {"kind": "table", "key": key, "rows": rows, "description": description}


def markdown(key: str, text: str, description: str = "") -> dict:
    return {"kind": "markdown", "key": key, "markdown": text, "description": description}


def link(key: str, url: str, text: str | None = None, description: str = "") -> dict:
    return {"kind": "link", "key": key, "link": url, "text": text or url, "description": description}


def finite(values: Sequence[Any]) -> list[float]:
    """The finite numbers of `values` (None, NaN and infinities dropped), as floats."""
    out = []
    for v in values:
        if v is None:
            continue
        f = float(v)
        if math.isfinite(f):
            out.append(f)
    return out


def finite_array(values: Any):
    """The finite numbers of `values` as a float64 numpy array: a numpy array or pyarrow array is converted
    without a Python loop (nulls become NaN and are dropped), so millions of rows cost milliseconds."""
    import numpy as np

    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):  # pyarrow Array / ChunkedArray
        values = values.to_numpy(zero_copy_only=False)
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):  # a list holding None
        a = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    a = a.reshape(-1)
    return a[np.isfinite(a)]


def rounded(v: Any, digits: int = 4) -> Any:
    """A number for a table cell: rounded, NaN/inf as None; anything else unchanged."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return round(v, digits) if math.isfinite(v) else None
    return v


def histogram(values: Sequence[Any], bins: int = 10, width: int = 30) -> list[dict[str, Any]]:
    """A small histogram table of the finite `values`: one row per bin (`from`, `to`, `count`, a text bar);
    values equal to the top edge count in the last bin. No finite value: no rows."""
    import numpy as np

    xs = finite_array(values)
    if not xs.size:
        return []
    lo, hi = float(xs.min()), float(xs.max())
    if hi == lo:
        return [{"from": rounded(lo), "to": rounded(hi), "count": int(xs.size), "bar": BAR * width}]
    step = (hi - lo) / bins
    # floor((x - lo) / step), values on the top edge in the last bin
    index = np.minimum(bins - 1, ((xs - lo) / step).astype(np.int64))
    counts = [int(c) for c in np.bincount(index, minlength=bins)]
    top = max(counts)
    return [
        {
            "from": rounded(lo + i * step),
            "to": rounded(lo + (i + 1) * step),
            "count": c,
            "bar": BAR * (round(width * c / top) if c else 0),
        }
        for i, c in enumerate(counts)
    ]


def sparkline(values: Sequence[Any], width: int = 60) -> str:
    """A unicode sparkline of `values` (at most `width` characters: longer series are averaged into buckets);
    missing or non-finite values become spaces."""
    vals = [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]
    if len(vals) > width:
        buckets = []
        for i in range(width):
            part = finite(vals[i * len(vals) // width : (i + 1) * len(vals) // width])
            buckets.append(sum(part) / len(part) if part else None)
        vals = buckets
    xs = finite(vals)
    if not xs:
        return ""
    lo, hi = min(xs), max(xs)
    span = hi - lo
    return "".join(
        " " if v is None else SPARK[0 if span == 0 else min(7, int((v - lo) / span * 8))] for v in vals
    )


def sample_indices(n: int, k: int) -> list[int]:
    """At most `k` indices spread evenly over range(n), always the first and the last."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def summary(values: Sequence[Any]) -> dict[str, Any]:
    """count, min, mean, max of the finite `values` (None where there are none)."""
    xs = finite_array(values)
    if not xs.size:
        return {"count": 0, "min": None, "mean": None, "max": None}
    return {
        "count": int(xs.size),
        "min": rounded(float(xs.min())),
        "mean": rounded(float(xs.mean())),
        "max": rounded(float(xs.max())),
    }


def correlation(x: Sequence[Any], y: Sequence[Any]) -> float | None:
    """Pearson's correlation over the pairs where both are finite; None with under 2 pairs or no spread."""
    pairs = [
        (float(a), float(b))
        for a, b in zip(x, y, strict=True)
        if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))
    ]
    if len(pairs) < 2:
        return None
    mx = sum(a for a, _ in pairs) / len(pairs)
    my = sum(b for _, b in pairs) / len(pairs)
    sxy = sum((a - mx) * (b - my) for a, b in pairs)
    sxx = sum((a - mx) ** 2 for a, _ in pairs)
    syy = sum((b - my) ** 2 for _, b in pairs)
    if sxx <= 0 or syy <= 0:
        return None
    return rounded(sxy / math.sqrt(sxx * syy))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """`rows` as a GitHub-style markdown table (columns of the first row)."""
    if not rows:
        return "_(no rows)_"
    cols = list(rows[0])

    def cell(v: Any) -> str:
        v = rounded(v)
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
