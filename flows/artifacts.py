"""Prefect artifacts of a stage run: generic ones from the manifest and the markers, plus the stage's own
plain-data descriptions (`Stage.describe`, see `dp2o.describe`) turned into table/markdown/link artifacts.

Every stage run publishes, under keys stable for its stage folder (`dp2o-<stage>-<sha1(out_url)[:12]>-...`, so
a rerun adds a new version of the same keys instead of new keys):

    ...-progress   progress, created when the stage starts and updated as shards commit
    ...-shards     a table of shards (name, rows, errors, seconds, device): the first and last 50 and a summary row
    ...-output     a link to the stage folder
    ...-manifest   a link to its _MANIFEST.json
    ...-<key>      each description the stage's `describe` returns

The pipeline flow adds `dp2o-pipeline-<sha1(root)[:12]>-result`, its per-stage record as a table.

Publishing never fails a stage: an artifact that cannot be made is logged and skipped.
"""

from __future__ import annotations

import logging
import re
from hashlib import sha1
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from dp2o import registry
from dp2o.plan import StagePlan
from dp2o.storage import MANIFEST, MARKERS, Storage

log = logging.getLogger("dp2o")

#: shards listed at each end of the shards table (the rest are summed in its summary row)
SHARD_ROWS_EACH_END = 50


def artifact_key(stage: str, out_url: str, suffix: str) -> str:
    """`dp2o-<stage>-<first 12 hex of sha1(out_url)>-<suffix>`, reduced to lowercase letters, digits, dashes."""
    h = sha1(out_url.encode()).hexdigest()[:12]
    key = f"dp2o-{stage}-{h}-{suffix}".lower()
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", key)).strip("-")


def browsable(url: str) -> str:
    """A URL for a link artifact: local paths as file:// URIs, remote URLs as they are."""
    return url if "://" in url else Path(url).resolve().as_uri()


def _safely(what: str, fn, *args, **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # an artifact is a report: never let it fail the stage
        log.warning("artifact %s not published: %s: %s", what, type(e).__name__, e)
        return None


def _link(key: str, url: str, description: str) -> None:
    """A link artifact to `url` (a browsable form of it; the URL itself as its text), never failing the run."""
    _safely(key, create_link_artifact, browsable(url), link_text=url, key=key, description=description)


class Progress:
    """The stage's progress artifact: created at the start, then moved as shards commit."""

    def __init__(self, plan: StagePlan):
        self.total = max(1, len(plan.shards))
        self.stage = plan.stage
        self.key = artifact_key(plan.stage, plan.out_url, "progress")
        self.base = 0
        self.done = 0
        self.markers: list[dict] = []
        self.id: UUID | None = _safely(
            self.key,
            create_progress_artifact,
            0.0,
            key=self.key,
            description=f"{plan.stage}: shards committed, of {len(plan.shards)} ({plan.out_url})",
        )

    def start(self, todo: int) -> None:
        """`todo` shards are about to run; the others are already committed."""
        self.base = max(0, self.total - todo)
        self._set(100.0 * self.base / self.total)

    def committed(self, result: Any) -> None:
        """One call of the shard map returned: a marker, or a list of them (whole-dataset stages)."""
        markers = result if isinstance(result, list) else [result]
        self.markers.extend(m for m in markers if isinstance(m, dict))
        self.done += max(1, len(markers))
        self._set(100.0 * min(self.total, self.base + self.done) / self.total)

    def finish(self) -> None:
        self._set(100.0)

    def _set(self, value: float) -> None:
        if self.id is not None:
            _safely(self.key, update_progress_artifact, self.id, round(value, 2))


def tracked(map_shards, progress: Progress, *, per_result: bool):
    """`map_shards` that moves `progress`: as each call returns (`per_result`: the map takes `on_result`), or
    once the whole map has returned (an executor that reports only at the end, e.g. Ray)."""

    def run(fn, calls, concurrency):
        calls = list(calls)
        progress.start(sum(len(args[1]) if isinstance(args[1], list) else 1 for args in calls))
        if per_result:
            return map_shards(fn, calls, concurrency, on_result=progress.committed)
        results = map_shards(fn, calls, concurrency)
        for r in results:
            progress.committed(r)
        return results

    return run


def _marker(out: Storage, name: str) -> dict:
    try:
        return out.read_json(MARKERS, f"{name}.json")
    except Exception:
        return {}


def shard_rows(plan: StagePlan, manifest: dict, fresh: list[dict]) -> list[dict]:
    """The shards table: the first and last `SHARD_ROWS_EACH_END` shards, and a summary row over all of them
    when some are left out. Seconds and device come from the markers (this run's, else read for shown ones)."""
    shards = manifest.get("shards", [])
    by_name = {m.get("shard"): m for m in fresh}
    n = SHARD_ROWS_EACH_END
    shown = shards if len(shards) <= 2 * n + 1 else shards[:n] + shards[-n:]
    out = plan.out
    rows = []
    for s in shown:
        m = by_name.get(s["name"]) or _marker(out, s["name"])
        stats = m.get("stats") or {}
        row = {
            "shard": s["name"],
            "rows": s.get("rows"),
            "errors": s.get("errors"),
            "seconds": m.get("seconds"),
        }
        device = m.get("device") or stats.get("device")
        if device is not None:
            row["device"] = str(device)
        rows.append(row)
    if any("device" in r for r in rows):
        for r in rows:
            r.setdefault("device", "")
    if len(shown) < len(shards):
        total = {
            "shard": f"all {len(shards)} shards ({len(shards) - len(shown)} not listed)",
            "rows": manifest.get("rows"),
            "errors": manifest.get("errors"),
            "seconds": round(sum(m.get("seconds") or 0.0 for m in fresh), 3) if fresh else None,
        }
        if rows and "device" in rows[0]:
            total["device"] = ""
        rows.append(total)
    return rows


def publish_description(plan: StagePlan, item: dict) -> None:
    """One plain-data description of `Stage.describe` as a Prefect artifact."""
    key = artifact_key(plan.stage, plan.out_url, item["key"])
    desc = item.get("description") or None
    kind = item["kind"]
    if kind == "table":
        create_table_artifact(item["rows"], key=key, description=desc)
    elif kind == "markdown":
        create_markdown_artifact(item["markdown"], key=key, description=desc)
    elif kind == "link":
        create_link_artifact(browsable(item["link"]), link_text=item.get("text"), key=key, description=desc)
    else:
        raise ValueError(f"unknown description kind {kind!r}")


def publish_stage(plan: StagePlan, manifest: dict, fresh: list[dict] | None = None) -> None:
    """The finished stage's artifacts: shards table, links to its folder and manifest, its own descriptions."""
    if not manifest:
        return  # a partition that left the last shards to other workers: the finisher publishes
    url = plan.out_url
    _safely(
        "shards",
        create_table_artifact,
        shard_rows(plan, manifest, fresh or []),
        key=artifact_key(plan.stage, url, "shards"),
        description=f"{plan.stage}: {len(manifest.get('shards', []))} shards, {manifest.get('rows')} rows, "
        f"{manifest.get('errors')} errors",
    )
    _link(artifact_key(plan.stage, url, "output"), url, f"{plan.stage} output folder")
    _link(artifact_key(plan.stage, url, "manifest"), plan.out.join_url(MANIFEST), f"{plan.stage} manifest")
    stage = registry.get(plan.stage)
    if stage.describe is None:
        return
    items = _safely(f"{plan.stage} description", stage.describe, manifest, url, plan.out) or []
    for item in items:
        _safely(item.get("key", "?"), publish_description, plan, item)


def publish_run(root: str, record: dict) -> None:
    """The pipeline run's record (`dp2o.driver.run_record`) as a table artifact, one row per stage, under the
    key `dp2o-pipeline-<sha1(root)[:12]>-result` (a rerun adds a version); the summary is its description."""
    rows = [{"stage": name, **fields} for name, fields in record["stages"].items()]
    _safely(
        "pipeline result",
        create_table_artifact,
        rows,
        key=artifact_key("pipeline", root, "result"),
        description=f"dp2o run of {root}: wall time {record.get('wall_seconds')} s\n\n```\n"
        f"{record['summary'].strip()}\n```",
    )
    if record.get("report"):
        _link(
            artifact_key("pipeline", root, "report"),
            record["report"],
            "the run's HTML report: stages, sampled inputs with their ranked candidates and pairs, reward "
            "histograms, the loss curve, evaluation (dp2o report)",
        )
