"""`dp2o report`: one self-contained HTML page about a run root, to look at what a run made.

    from dp2o.report import write_report
    write_report("runs/demo")                     # -> runs/demo/report.html
    write_report("s3://bucket/run", "report.html", inputs=4, storage_options={...})

The page shows, per stage of the registry (and an evaluate stage when there is one), what ran and where:
fingerprint, folder, shards, rows, errors, seconds, device where a stage records it. Then, for a few inputs
spread evenly over the sorted sample ids, the LR and HR crops and the M candidates sorted by reward (best
first), each with its reward and raw metric values, winners and losers of the preference pairs marked with
their pair weights; histograms of the reward and of every raw metric; the training loss and implicit
accuracy curves; the evaluation's Best/Mean/Worst@M tables when an evaluate stage ran.

The design choices a reader would miss:
* Nothing on the page points outside it: images are small JPEG/PNG thumbnails in `data:` URIs, charts are
  inline SVG written here, the CSS is inline and there is no JavaScript, so the file can be mailed, opened
  offline or attached to an orchestrator's run, and it renders the same everywhere.
* Stage folders are found through manifests only, like every other reader: a stage's runs are the
  `<root>/<stage>/<fingerprint>` folders holding a `config.json`, and the inputs section follows the
  `upstream` lineage of the deepest finished run (newest when several finished), looked up by fingerprint
  under the root first, so a run root that was moved or copied still reports.
* A large run stays fast: only the sampled inputs' images are read (their members of the tar shards, through
  `dp2o.images`, each checked against its marker), and only the Parquet tables, which are small, are read
  whole. On an object store the tar shards holding sampled inputs are downloaded once each, never the others.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dp2o import describe as d
from dp2o import registry
from dp2o.charts import histogram_svg, line_svg
from dp2o.errors import Dp2oError, StageError
from dp2o.overview import RunStatus, run_status, stage_folders
from dp2o.plan import read_manifest, read_stage_table, resolve_stage_dir
from dp2o.storage import MANIFEST, MARKERS, Storage, read_parquet

#: default file name of the report inside the run root
REPORT_NAME = "report.html"
#: longest side of an image thumbnail, in pixels
THUMB_SIDE = 160
#: side at which every image of the inputs section is shown (small LR crops are enlarged, pixelated)
SHOW_SIDE = 108
#: thumbnails up to this side are PNG (lossless: LR crops are tiny), larger ones JPEG of this quality
PNG_UP_TO = 64
JPEG_QUALITY = 88
#: stages whose folders hold the images of the inputs section
IMAGE_STAGES = ("degrade", "sample")


# ---- the run: stage folders, runs and the lineage the inputs section follows ------------------------------------


@dataclass
class Run(RunStatus):
    """One `<root>/<stage>/<fingerprint>` folder: its status (`dp2o.overview.RunStatus`), plus the timing,
    device and summary lines the report shows."""

    stage: str
    dir: Storage
    seconds: float | None
    device: str | None
    created: str | None
    summary: list[str] = field(default_factory=list)


def _markers(run: Storage, names: Sequence[str]) -> list[dict]:
    """The marker JSON of each named shard (fetched concurrently where the filesystem can: one request per
    marker on an object store); unreadable ones are left out (the manifest says the shards are committed)."""
    paths = [run.p(MARKERS, f"{n}.json") for n in names]
    if not paths:
        return []
    try:
        blobs = run.fs.cat(paths, on_error="omit")
    except Exception:  # a report never fails on a timing
        return []
    out = []
    for p in paths:
        try:
            out.append(json.loads(blobs[p]))
        except (KeyError, ValueError):
            continue
    return [m for m in out if isinstance(m, dict)]


def _seconds_device(markers: list[dict]):
    """(sum of the shards' seconds, device the stats record or None) from the markers."""
    secs = [m.get("seconds") for m in markers if isinstance(m.get("seconds"), int | float)]
    devices = sorted({str(m["stats"]["device"]) for m in markers if (m.get("stats") or {}).get("device")})
    return (round(sum(secs), 3) if secs else None), (", ".join(devices) or None)


def _run_of(stage: str, run: Storage) -> Run:
    st = run_status(run)
    if st.finished:
        m = st.manifest
        seconds, device = _seconds_device(_markers(run, [s["name"] for s in m["shards"]]))
        device = device or (m.get("stats") or {}).get("device")
        summary: list[str] = []
        spec = registry.get(stage) if stage in registry.names() else None
        if spec is not None and spec.summarize is not None:
            try:
                summary = [line.strip() for line in spec.summarize({**m, "url": run.url})]
            except Exception:  # a report never fails on a summary line (e.g. a manifest of another version)
                summary = []
    else:
        seconds, device = _seconds_device(st.markers)
        summary = []
    return Run(
        **vars(st),
        stage=stage,
        dir=run,
        seconds=seconds,
        device=device,
        created=st.manifest.get("created") if st.manifest else None,
        summary=summary,
    )


def _check_root(root: Storage, url: str) -> list[str]:
    """The stage folder names of a run root (see `dp2o inspect`); a Dp2oError naming the fix otherwise."""
    if not root.fs.isdir(root.path):
        raise Dp2oError(
            f"report: {url} is not a folder; pass a run root (the --root of `dp2o run`, e.g. runs/demo)"
        )
    if root.exists(MANIFEST):
        raise Dp2oError(
            f"report: {url} is a stage folder, not a run root; pass the run root two levels up "
            "(the folder holding degrade/, sample/, ...)"
        )
    names = stage_folders(root)
    if not names:
        raise Dp2oError(
            f"report: {url} holds no stage folders (degrade/, sample/, ...); pass a run root "
            "(the --root of `dp2o run`, e.g. runs/demo), or run the pipeline into it first"
        )
    return names


def _stage_runs(root: Storage, names: list[str]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for name in names:
        folder = root.child(name)
        fps = [r for r in folder.listdir() if folder.exists(r, "config.json")]
        out[name] = [_run_of(name, folder.child(fp)) for fp in fps]
    return out


def _lineage(root: Storage, runs: dict[str, list[Run]]) -> dict[str, Storage]:
    """The finished stage folders the inputs section shows: the deepest finished pipeline run (newest when
    several) and every stage its manifest records upstream (found by fingerprint under the root first)."""
    order = [s.name for s in registry.pipeline_stages()]
    for stage in reversed(order):
        done = [r for r in runs.get(stage, []) if r.finished]
        if not done:
            continue
        anchor = max(done, key=lambda r: (r.created or "", r.fingerprint))
        chain = {stage: anchor.dir}
        for up_stage, entry in (anchor.manifest or {}).get("upstream", {}).items():
            if not isinstance(entry, dict) or not entry.get("fingerprint"):
                continue
            here = root.child(up_stage, str(entry["fingerprint"]))
            if here.exists(MANIFEST):
                chain[up_stage] = here
                continue
            url = entry.get("url")
            try:
                there = Storage(url, root.storage_options) if url else None
                if there is not None and there.exists(MANIFEST):
                    chain[up_stage] = there
            except Exception:  # an upstream that is not a folder (a user's file, bundled://): not shown
                continue
        return chain
    return {}


# ---- images ---------------------------------------------------------------------------------------------------


def _thumb(png: bytes, side: int = THUMB_SIDE) -> tuple[str, int, int]:
    """(data: URI of a small PNG/JPEG thumbnail, its width, height) of PNG bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        if max(im.size) > side:
            im.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if max(im.size) <= PNG_UP_TO:
            im.save(buf, format="PNG", optimize=True)
            mime = "image/png"
        else:
            im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
            mime = "image/jpeg"
        w, h = im.size
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}", w, h


def _image(row: dict, stage_dir: Storage, which: str) -> tuple[str | None, str | None]:
    """(img tag, None) of one image of a row, or (None, why) when it cannot be read."""
    from dp2o.images import read_image_bytes

    try:
        uri, w, h = _thumb(read_image_bytes(row, stage_dir, which))
    except (KeyError, Dp2oError, OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"
    sw = SHOW_SIDE if w >= h else max(1, round(SHOW_SIDE * w / h))
    sh = SHOW_SIDE if h >= w else max(1, round(SHOW_SIDE * h / w))
    pix = ' class="px"' if max(w, h) < SHOW_SIDE else ""
    return f'<img{pix} src="{uri}" width="{sw}" height="{sh}" alt="{_e(which)}">', None


# ---- HTML and SVG helpers ------------------------------------------------------------------------------------


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):  # bool too
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "–"
    return f"{f:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    c = f' class="{_e(cls)}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:20px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8dce4}
h3{font-size:14px;margin:14px 0 6px}code{font:12px ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
nav a{margin-right:12px}.muted{color:#667}.small{font-size:12px}
table{border-collapse:collapse;margin:6px 0 10px}th,td{border:1px solid #d8dce4;padding:3px 7px;
text-align:left;vertical-align:top;font-size:13px}th{background:#f2f4f8}td.n{text-align:right}
.notrun{color:#8a8f99;font-style:italic}.strip{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}
.refs{display:flex;flex-direction:column;gap:4px}
figure{box-sizing:border-box;margin:0;padding:3px;border:3px solid transparent;border-radius:4px;width:120px;
font-size:10px}
figure img{display:block;background:#eee}img.px{image-rendering:pixelated}
figure.ref{background:#f2f4f8}figure.win{border-color:#1a9641}figure.lose{border-color:#d7191c}
figcaption{margin-top:2px;line-height:1.25}.tag{display:inline-block;padding:0 4px;border-radius:3px;
color:#fff;font-weight:600;font-size:10px}.tag.win{background:#1a9641}.tag.lose{background:#d7191c}
.missing{width:108px;height:108px;display:flex;align-items:center;justify-content:center;background:#f6e7e7;
color:#8a1c1c;font-size:10px;overflow:hidden;text-align:center}
.sep{width:2px;align-self:stretch;background:#d8dce4;margin:0 2px}.charts{display:flex;flex-wrap:wrap;gap:14px}
svg.chart{margin:0}
ul.sum{margin:2px 0 6px 18px;padding:0}
"""


# ---- sections ---------------------------------------------------------------------------------------------------


def _stages_section(runs: dict[str, list[Run]], shown: dict[str, Storage]) -> str:
    rows = []
    shown_urls = {s.url for s in shown.values()}
    for name, rs in runs.items():
        link = f'<a href="#stage-{_e(name)}">{_e(name)}</a>'
        if not rs:
            rows.append([link, '<span class="notrun">not run</span>', "", "", "", "", "", "", "", ""])
        for r in rs:
            rows.append(
                [
                    link,
                    _e(r.status),
                    f"<code>{_e(r.fingerprint)}</code>" + (" ★" if r.dir.url in shown_urls else ""),
                    _num(r.shards),
                    _num(r.rows),
                    _num(r.errors),
                    _num(r.seconds),
                    _e(r.device or "–"),
                    _e(r.size),
                    f"<code>{_e(r.dir.url)}</code>",
                ]
            )
    table = _table(
        ["stage", "status", "fingerprint", "shards", "rows", "errors", "seconds", "device", "size", "folder"],
        rows,
        "stages",
    )
    details = []
    for name, rs in runs.items():
        desc = registry.get(name).description if name in registry.names() else "(not a registered stage)"
        inner = [f"<h3>{_e(name)} <span class='muted small'>{_e(desc)}</span></h3>"]
        if not rs:
            inner.append('<p class="notrun">not run</p>')
        for r in rs:
            created = f", finished {_e(r.created)}" if r.created else ""
            inner.append(
                f"<p class='small'><code>{_e(r.dir.url)}</code> — {_e(r.status)}{created}; "
                f"{_num(r.rows)} rows, {_num(r.errors)} errors, {_num(r.seconds)} s in shards</p>"
            )
            if r.summary:
                inner.append(
                    "<ul class='sum small'>" + "".join(f"<li>{_e(x)}</li>" for x in r.summary) + "</ul>"
                )
        details.append(
            f'<div class="stage" id="stage-{_e(name)}" data-stage="{_e(name)}" data-runs="{len(rs)}">'
            + "".join(inner)
            + "</div>"
        )
    note = (
        "<p class='small muted'>★ the runs the sections below show (the deepest finished run and its upstream "
        "lineage). Seconds: the sum over shards of the time each took.</p>"
    )
    return "<section id='stages'><h2>Stages</h2>" + table + note + "".join(details) + "</section>"


def _metric_names(stage_dir: Storage, table) -> list[str]:
    from dp2o.score.stage import scored_metric_names

    return [n for n in scored_metric_names(read_manifest(stage_dir), table) if n in table.column_names]


def _pick(ids: Sequence[str], k: int) -> list[str]:
    """`k` sample ids spread evenly over the sorted ids (the first and the last always)."""
    ids = sorted(set(ids))
    return [ids[i] for i in d.sample_indices(len(ids), k)]


def _degrade_index(degrade: Storage) -> dict[str, dict]:
    """sample_id -> {source, status, shard} of a degrade folder, per shard (so images need no lookup)."""
    out: dict[str, dict] = {}
    for s in read_manifest(degrade)["shards"]:
        rel = f"data/{s['name']}.parquet"
        if rel not in s["files"]:
            continue
        t = read_parquet(degrade, rel, columns=["sample_id", "source", "status"])
        for sid, src, st in zip(*(t[c].to_pylist() for c in ("sample_id", "source", "status")), strict=True):
            out.setdefault(sid, {"source": src, "status": st, "shard": s["name"]})
    return out


def _same_shards(a: Storage, b: Storage) -> bool:
    return [s["name"] for s in read_manifest(a)["shards"]] == [s["name"] for s in read_manifest(b)["shards"]]


def _inputs_section(chain: dict[str, Storage], k: int) -> tuple[str, dict]:
    """The sampled inputs' images, candidates, metrics and pair marks; also the tables the charts use."""
    import pyarrow as pa
    import pyarrow.compute as pc

    degrade, sample = chain.get("degrade"), chain.get("sample")
    scores_dir = chain.get("reward") or chain.get("score")
    tables: dict[str, Any] = {}
    if degrade is None:
        return (
            "<section id='inputs'><h2>Sampled inputs</h2><p class='notrun'>no finished degrade stage: "
            "nothing to show</p></section>",
            tables,
        )
    index = _degrade_index(degrade)
    scores = None
    metrics: list[str] = []
    if scores_dir is not None:
        scores = read_stage_table(scores_dir)
        metrics = _metric_names(scores_dir, scores)
        tables["scores"] = (scores, metrics, "reward" in scores.column_names)
    if scores is not None and scores.num_rows:
        ok = scores.filter(pc.equal(scores["status"], "ok")) if "status" in scores.column_names else scores
        pool = ok["sample_id"].to_pylist()
    else:
        pool = [sid for sid, r in index.items() if r["status"] == "ok"]
    picked = _pick(pool, k)
    n_total = len({*pool})

    cands: dict[str, list[dict]] = {sid: [] for sid in picked}
    if sample is not None and picked:
        st = read_stage_table(sample, ["sample_id", "candidate", "status", "error"])
        st = st.filter(pc.is_in(st["sample_id"], pa.array(picked)))
        for r in st.to_pylist():
            cands[r["sample_id"]].append(r)
    by_key: dict[tuple[str, int], dict] = {}
    if scores is not None and picked:
        part = scores.filter(pc.is_in(scores["sample_id"], pa.array(picked)))
        for r in part.to_pylist():
            by_key[(r["sample_id"], int(r["candidate"]))] = r
            if sample is None:
                cands[r["sample_id"]].append({"sample_id": r["sample_id"], "candidate": r["candidate"]})
    roles: dict[tuple[str, int], list[tuple[str, int, float]]] = {}
    n_pairs = 0
    if chain.get("pairs") is not None and picked:
        pt = read_stage_table(chain["pairs"], ["sample_id", "win", "lose", "weight"])
        pt = pt.filter(pc.is_in(pt["sample_id"], pa.array(picked)))
        for r in pt.to_pylist():
            n_pairs += 1
            roles.setdefault((r["sample_id"], int(r["win"])), []).append(("win", int(r["lose"]), r["weight"]))
            roles.setdefault((r["sample_id"], int(r["lose"])), []).append(
                ("lose", int(r["win"]), r["weight"])
            )
    shard_ok = sample is not None and _same_shards(degrade, sample)

    blocks = []
    for sid in picked:
        info = index.get(sid, {})
        ref_row = {"sample_id": sid, **({"shard": info["shard"]} if "shard" in info else {})}
        refs = []
        for which, label in (("lr", "LR input"), ("hr", "HR")):
            tag, why = _image(ref_row, degrade, which)
            refs.append(_figure(tag, why, f"<b>{label}</b>", "ref", {"which": which}))
        figs = [f'<div class="refs">{"".join(refs)}</div>', '<div class="sep"></div>']

        group = sorted(
            cands[sid], key=lambda c, sid=sid: _best_first(by_key.get((sid, int(c["candidate"])), {}), c)
        )
        for rank, c in enumerate(group, start=1):
            cand = int(c["candidate"])
            scored = by_key.get((sid, cand), {})
            lines = [f"<b>#{rank}</b> · c{cand}"]
            if "reward" in scored:
                lines.append(f"reward <b>{_num(scored.get('reward'))}</b>")
            lines += [f"{_e(m)} {_num(scored.get(m))}" for m in metrics if m in scored]
            if c.get("status") not in (None, "ok"):
                lines.append(f"<span class='lose'>failed: {_e(c.get('error'))}</span>")
            mine = roles.get((sid, cand), [])
            role = ""
            if mine:
                kinds = {x[0] for x in mine}
                role = "win" if kinds == {"win"} else "lose" if kinds == {"lose"} else "win lose"
                for kind, other, w in mine:
                    weight = "–" if w is None or not math.isfinite(w) else f"{w:.3f}"
                    lines.append(f"<span class='tag {kind}'>{kind}</span> vs c{other} w {weight}")
            if c.get("status") in (None, "ok"):
                row = {"sample_id": sid, "candidate": cand}
                if shard_ok and "shard" in info:
                    row["shard"] = info["shard"]
                tag, why = _image(row, sample, "sr") if sample is not None else (None, "no sample stage")
            else:
                tag, why = None, "failed candidate: no image"
            attrs = {
                "candidate": cand,
                "rank": rank,
                "role": role,
                "reward": "" if "reward" not in scored else _num(scored.get("reward"), 12),
            }
            figs.append(_figure(tag, why, "<br>".join(lines), f"cand {role}".strip(), attrs))
        src = info.get("source")
        head = f"<h3><code>{_e(sid)}</code>" + (
            f" <span class='muted small'>from {_e(src)}</span>" if src else ""
        )
        head += f" <span class='muted small'>· {len(group)} candidates</span></h3>"
        blocks.append(
            f'<div class="input" data-sample-id="{_e(sid)}">{head}<div class="strip">{"".join(figs)}</div></div>'
        )
    order = (
        "by reward, best first" if scores is not None and "reward" in scores.column_names else "by candidate"
    )
    intro = (
        f"<p class='small muted'>{len(picked)} of {n_total} inputs, spread evenly over the sorted sample ids. "
        f"LR input and HR crop, then the candidates {order}, with their raw metric values. Pairs: "
        "<span class='tag win'>win</span> the winner / <span class='tag lose'>lose</span> the loser of a pair "
        f"(border green / red), with the other candidate of the pair and the pair's weight ({n_pairs} pairs among these inputs).</p>"
    )
    tables["picked"] = picked
    return (
        f"<section id='inputs' data-inputs='{len(picked)}'><h2>Sampled inputs</h2>{intro}{''.join(blocks)}"
        "</section>",
        tables,
    )


def _best_first(scored: dict, cand: dict) -> tuple[float, int]:
    """Sort key of a candidate: highest reward first (none or NaN last), then by candidate number."""
    v = scored.get("reward")
    r = float(v) if v is not None and math.isfinite(float(v)) else -math.inf
    return -r, int(cand["candidate"])


def _figure(tag: str | None, why: str | None, caption: str, cls: str, attrs: dict) -> str:
    data = "".join(f' data-{k}="{_e(v)}"' for k, v in attrs.items())
    body = tag if tag is not None else f'<div class="missing">{_e(why)}</div>'
    return f'<figure class="{_e(cls)}"{data}>{body}<figcaption>{caption}</figcaption></figure>'


def _rewards_section(tables: dict) -> str:
    if "scores" not in tables:
        return (
            "<section id='rewards'><h2>Rewards and metrics</h2><p class='notrun'>not scored yet</p></section>"
        )
    t, metrics, has_reward = tables["scores"]
    charts = []
    if has_reward:
        charts.append(histogram_svg(f"reward ({t.num_rows} candidates)", t["reward"].to_pylist()))
    for m in metrics:
        charts.append(histogram_svg(f"{m} (raw)", t[m].to_pylist()))
    return (
        "<section id='rewards'><h2>Rewards and metrics</h2><p class='small muted'>Histograms over every "
        f"scored candidate of the run (20 bins).</p><div class='charts'>{''.join(charts)}</div></section>"
    )


def _train_section(runs: dict[str, list[Run]], chain: dict[str, Storage]) -> str:
    train = chain.get("train")
    if train is None:
        done = [r for r in runs.get("train", []) if r.finished]
        train = done[-1].dir if done else None
    if train is None:
        return "<section id='train'><h2>Training</h2><p class='notrun'>not run</p></section>"
    m = read_manifest(train)
    rows = read_parquet(train, "data/metrics.parquet").to_pylist() if m.get("rows") else []
    steps = [r.get("step") for r in rows]
    charts = [
        line_svg(
            "train loss", steps, [("loss", [r.get("loss") for r in rows])], reference=("ln 2", math.log(2))
        ),
        line_svg(
            "implicit accuracy",
            steps,
            [("implicit acc", [r.get("implicit_acc") for r in rows])],
            reference=("chance", 0.5),
        ),
    ]
    st = m.get("stats", {})
    facts = [
        ("logged steps", len(rows)),
        ("steps", st.get("steps")),
        ("pairs", st.get("pairs")),
        ("beta", st.get("beta")),
        ("first loss", st.get("first_loss")),
        ("final loss", st.get("final_loss")),
        ("final implicit accuracy", st.get("final_implicit_acc")),
        ("seconds per step", st.get("seconds_per_step")),
    ]
    table = _table(["", ""], [[_e(k), _num(v)] for k, v in facts], "facts")
    model = f"<p class='small'>tuned model: <code>{_e(train.join_url('model'))}</code></p>"
    return f"<section id='train'><h2>Training</h2><div class='charts'>{''.join(charts)}</div>{table}{model}</section>"


def _evaluate_section(dirs: list[Storage]) -> str:
    if not dirs:
        return (
            "<section id='evaluate'><h2>Evaluation</h2><p class='notrun'>not run (`dp2o evaluate --model "
            "&lt;root&gt;/train --heldout DIR --out &lt;root&gt;/evaluate/NAME`, or pass --evaluate DIR)</p></section>"
        )
    parts = []
    for ev in dirs:
        parts.append(f"<h3><code>{_e(ev.url)}</code></h3>")
        if ev.exists("summary.md"):
            with ev.open("summary.md") as f:
                text = f.read().decode("utf-8")
            items = [ln[2:] for ln in text.splitlines() if ln.startswith("- ")]
            if items:
                parts.append("<ul class='sum small'>" + "".join(f"<li>{_e(x)}</li>" for x in items) + "</ul>")
        try:
            rows = read_parquet(ev, "data/summary.parquet").to_pylist()
        except (FileNotFoundError, Dp2oError) as e:
            parts.append(f"<p class='notrun'>no summary table: {_e(e)}</p>")
            continue
        stats = list(dict.fromkeys(r["statistic"] for r in rows))
        stats.sort(key=lambda s: s != "reward")
        for stat in stats:
            mine = [r for r in rows if r["statistic"] == stat]
            at = list(dict.fromkeys(r["at_m"] for r in mine))
            models = list(dict.fromkeys(r["model"] for r in mine))
            better = "higher" if mine[0].get("higher_better") else "lower"
            body = []
            for mdl in models:
                cells = [
                    f"<b>{_e(mdl)}</b>",
                    _num(next((r["inputs"] for r in mine if r["model"] == mdl), None)),
                ]
                for a in at:
                    r = next((x for x in mine if x["model"] == mdl and x["at_m"] == a), None)
                    if r is None:
                        cells.append("–")
                        continue
                    ci = (
                        ""
                        if r["lo"] is None or not math.isfinite(r["lo"])
                        else f" [{_num(r['lo'])}, {_num(r['hi'])}]"
                    )
                    cells.append(f"{_num(r['value'])}<span class='muted small'>{_e(ci)}</span>")
                body.append(cells)
            head = ["model", "inputs", *[f"{a.capitalize()}@M" for a in at]]
            parts.append(
                f"<p class='small'><b>{_e(stat)}</b> ({better} is better)</p>" + _table(head, body, "eval")
            )
    return (
        "<section id='evaluate'><h2>Evaluation</h2><p class='small muted'>Mean over held-out inputs with its "
        "t-interval; <code>tuned-base</code>: differences paired per input.</p>"
        + "".join(parts)
        + "</section>"
    )


# ---- the page ---------------------------------------------------------------------------------------------------


def _evaluate_dirs(runs: dict[str, list[Run]], evaluate: str | None, storage_options: dict) -> list[Storage]:
    found = [
        r.dir
        for r in sorted(runs.get("evaluate", []), key=lambda r: r.created or "", reverse=True)
        if r.finished
    ]
    if evaluate:
        try:
            ev = resolve_stage_dir(evaluate, storage_options, "evaluate")
        except StageError as e:
            raise Dp2oError(f"report: --evaluate {evaluate}: {e}") from None
        stage = read_manifest(ev).get("stage")
        if stage != "evaluate":
            raise Dp2oError(
                f"report: --evaluate {ev.url} is a finished {stage} stage folder; pass the folder an "
                "evaluate run wrote (its --out)"
            )
        found = [ev, *[f for f in found if f.url != ev.url]]
    return found


def build_report(
    root: str, *, inputs: int = 8, storage_options: dict | None = None, evaluate: str | None = None
) -> str:
    """The report of the run root `root` as one HTML string (see the module docstring)."""
    if inputs < 1:
        raise Dp2oError(f"report: inputs={inputs}; show at least 1 input (--inputs K)")
    t0 = time.perf_counter()
    so = dict(storage_options or {})
    r = Storage(root, so)
    names = _check_root(r, root)
    runs = _stage_runs(r, names)
    chain = _lineage(r, runs)
    stages = _stages_section(runs, chain)
    samples, tables = _inputs_section(chain, inputs)
    rewards = _rewards_section(tables)
    train = _train_section(runs, chain)
    ev = _evaluate_section(_evaluate_dirs(runs, evaluate, so))
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (
            ("stages", "Stages"),
            ("inputs", "Sampled inputs"),
            ("rewards", "Rewards"),
            ("train", "Training"),
            ("evaluate", "Evaluation"),
        )
    )
    took = time.perf_counter() - t0
    head = (
        f"<h1>dp2o run report</h1><p class='small'>run root <code>{_e(r.url)}</code> · made "
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} in {took:.1f} s by <code>dp2o report</code></p><nav>{nav}</nav>"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>dp2o report: {_e(r.url)}</title><style>{CSS}</style></head><body>"
        f"{head}{stages}{samples}{rewards}{train}{ev}</body></html>\n"
    )


def write_report(
    root: str,
    out: str | None = None,
    *,
    inputs: int = 8,
    storage_options: dict | None = None,
    evaluate: str | None = None,
) -> str:
    """Write the HTML report of the run root `root` (a local folder or an fsspec URL) to `out` (default
    `<root>/report.html`; a local path or URL) and return where it was written.

    inputs: how many inputs the images section shows (spread evenly over the sample ids); evaluate: a finished
    evaluate stage folder outside the root to show (those under `<root>/evaluate` are found by themselves)."""
    so = dict(storage_options or {})
    page = build_report(root, inputs=inputs, storage_options=so, evaluate=evaluate).encode("utf-8")
    target = out or Storage(root, so).join_url(REPORT_NAME)
    folder, _, name = target.rstrip("/").rpartition("/")
    if not name or name in (".", ".."):
        raise Dp2oError(f"report: --out {out!r} names no file; pass e.g. {REPORT_NAME}")
    dest = Storage(folder or ".", so)
    if dest.local:
        path = dest.p(name)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(page)
        os.replace(tmp, path)
    else:
        dest.write_bytes_atomic(page, name)
    return target


def report_after_run(root: str, storage_options: dict | None = None) -> str | None:
    """Write `<root>/report.html` at the end of a pipeline run and return its URL; a report that cannot be made
    is logged and skipped (None): it never fails a run whose stages all committed."""
    import logging

    try:
        return write_report(root, storage_options=storage_options)
    except Exception as e:  # a report is a view of the run, not part of it
        logging.getLogger("dp2o").warning("report not written: %s: %s", type(e).__name__, e)
        return None
