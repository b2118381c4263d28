"""Small standalone SVG charts (a histogram, line charts) for the HTML report and the Prefect artifacts.

Each chart is one self-contained `<svg>` element: styles are attributes, not CSS classes, so the same text works
inline in an HTML page and as a picture of its own (`data_uri(svg)`), e.g. `![loss](data:image/svg+xml;...)` in a
Prefect markdown artifact, where the UI renders it as an `<img>` (checked in a real browser by
tests/test_ui_browser.py). No file, server or network is involved: the picture travels inside the artifact, so it
renders offline and whatever storage (local, S3) the run used. Charts of long series are drawn from at most
`MAX_POINTS` points, so a picture stays a few kB.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape
from typing import Any

from dp2o import describe as d

#: points drawn per line at most (longer series are sampled evenly, first and last kept)
MAX_POINTS = 400
#: colours of successive series
PALETTE = ("#c0392b", "#1a9641", "#2c6fbb", "#8e44ad", "#d68910")
_FONT = 'font-family="system-ui,sans-serif"'


def _num(v: float, digits: int = 4) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.{digits}g}"


def _frame(title: str, width: int, height: int) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<rect width="{width}" height="{height}" fill="#fcfcfd" stroke="#e3e6ec"/>',
        f'<text x="{width / 2:.1f}" y="15" font-size="12" text-anchor="middle" fill="#1d2330" {_FONT}>'
        f"{escape(title)}</text>",
    ]


def _label(x: float, y: float, text: str, anchor: str = "start", colour: str = "#556") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="10" text-anchor="{anchor}" fill="{colour}" {_FONT}>'
        f"{escape(text)}</text>"
    )


def histogram_svg(
    title: str, values: Sequence[Any], bins: int = 20, width: int = 360, height: int = 180
) -> str:
    """A bar chart of the finite `values` in `bins` equal bins (as `dp2o.describe.histogram`)."""
    rows = d.histogram(values, bins=bins)
    left, right, top, bottom = 36, 10, 24, 30
    pw, ph = width - left - right, height - top - bottom
    parts = _frame(title, width, height)
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#99a"/>')
    if not rows:
        parts.append(_label(width / 2, top + ph / 2, "no finite values", "middle"))
    else:
        most = max(r["count"] for r in rows) or 1
        bw = pw / len(rows)
        for i, r in enumerate(rows):
            bh = ph * r["count"] / most
            parts.append(
                f'<rect x="{left + i * bw + 0.5:.1f}" y="{top + ph - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                f'height="{bh:.1f}" fill="#4f7cc9"><title>{_num(r["from"])} to {_num(r["to"])}: {r["count"]}'
                "</title></rect>"
            )
        parts += [
            _label(left, height - 10, _num(rows[0]["from"])),
            _label(left + pw, height - 10, _num(rows[-1]["to"]), "end"),
            _label(left - 4, top + 8, str(most), "end"),
            _label(left - 4, top + ph, "0", "end"),
        ]
    parts.append("</svg>")
    return "".join(parts)


def _points(xs: Sequence[Any], ys: Sequence[Any]) -> list[tuple[float, float]]:
    pts = []
    for x, y in zip(xs, ys, strict=True):
        if x is None or y is None:
            continue
        fx, fy = float(x), float(y)
        if math.isfinite(fx) and math.isfinite(fy):
            pts.append((fx, fy))
    if len(pts) > MAX_POINTS:
        pts = [pts[i] for i in d.sample_indices(len(pts), MAX_POINTS)]
    return pts


def line_svg(
    title: str,
    xs: Sequence[Any],
    series: Sequence[tuple[str, Sequence[Any]]],
    *,
    width: int = 360,
    height: int = 180,
    reference: tuple[str, float] | None = None,
) -> str:
    """Lines of `series` ([(label, ys)], one colour each, a legend) over `xs`, on one y axis; `reference`
    (label, y) draws a dashed horizontal line (e.g. ln 2 under a DPO loss). Non-finite points are skipped."""
    lines = [(label, _points(xs, ys)) for label, ys in series]
    every = [p for _, pts in lines for p in pts]
    left, right, top, bottom = 46, 10, 24, 30
    pw, ph = width - left - right, height - top - bottom
    parts = _frame(title, width, height)
    parts += [
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#99a"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#99a"/>',
    ]
    if not every:
        parts.append(_label(width / 2, top + ph / 2, "no finite values", "middle"))
        parts.append("</svg>")
        return "".join(parts)
    x0, x1 = min(p[0] for p in every), max(p[0] for p in every)
    ys = [p[1] for p in every] + ([reference[1]] if reference else [])
    y0, y1 = min(ys), max(ys)

    def at(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * pw if x1 > x0 else left + pw / 2
        py = top + ph - (y - y0) / (y1 - y0) * ph if y1 > y0 else top + ph / 2
        return px, py

    if reference:
        _, ry = at(x0, reference[1])
        parts.append(
            f'<line x1="{left}" y1="{ry:.1f}" x2="{left + pw}" y2="{ry:.1f}" stroke="#888" stroke-dasharray="4 3">'
            f"<title>{escape(reference[0])}</title></line>"
        )
        parts.append(_label(left + pw - 2, ry - 3, reference[0], "end", "#777"))
    for i, (label, pts) in enumerate(lines):
        colour = PALETTE[i % len(PALETTE)]
        xy = [at(x, y) for x, y in pts]
        if len(xy) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        elif xy:
            parts.append(f'<circle cx="{xy[0][0]:.1f}" cy="{xy[0][1]:.1f}" r="2.5" fill="{colour}"/>')
        if len(lines) > 1 or label:
            parts.append(_label(left + 6 + 110 * i, top + 10, f"— {label}", "start", colour))
    parts += [
        _label(left - 4, top + 8, _num(y1, 3), "end"),
        _label(left - 4, top + ph, _num(y0, 3), "end"),
        _label(left, height - 10, _num(x0)),
        _label(left + pw, height - 10, _num(x1), "end"),
    ]
    parts.append("</svg>")
    return "".join(parts)


def data_uri(svg: str) -> str:
    """The SVG as a `data:image/svg+xml;base64,...` URI, for an `<img src>` or a markdown image."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def markdown_image(alt: str, svg: str) -> str:
    """A markdown image of the SVG (the alt text is kept to safe characters)."""
    safe = "".join(c for c in alt if c.isalnum() or c in " -_.,:()=/")
    return f"![{safe}]({data_uri(svg)})"
