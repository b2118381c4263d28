"""What a run root holds, read from storage only: its stage folders in registry order, and per stage run its
status (finished, or k of n shards committed), rows, errors and size. `dp2o inspect` prints it; the HTML report
(`dp2o.report`) shows it."""

from __future__ import annotations

from dataclasses import dataclass

from dp2o import registry


def stage_folders(root) -> list[str]:
    """Stage folders of a run root in registry order (pipeline stages even when absent: not started; other
    registered stages when present), then any other folder holding a run (a sub-folder with config.json)."""
    present = [n for n in root.listdir() if not n.startswith((".", "_"))]
    known = [st.name for st in registry.stages() if st.in_pipeline or st.name in present]
    other = [
        n
        for n in present
        if n not in known and any(root.exists(n, r, "config.json") for r in root.listdir(n))
    ]
    if not any(n in present for n in known) and not other:
        return []
    return known + other


@dataclass
class RunStatus:
    """What storage says about one stage run folder: finished (manifest) or k of n shards committed (markers)."""

    fingerprint: str
    finished: bool
    status: str
    manifest: dict | None
    markers: list[dict]
    shards: int | None
    rows: int
    errors: int
    size: str


def run_status(run) -> RunStatus:
    """The status of one stage run folder, read from its manifest, or from its markers while unfinished."""
    from dp2o.storage import MANIFEST

    fp = run.url.rsplit("/", 1)[-1]
    size = human_bytes(folder_bytes(run))
    if run.exists(MANIFEST):
        m = run.read_json(MANIFEST)
        n = len(m["shards"])
        return RunStatus(
            fp,
            True,
            f"finished, {n} shard(s)",
            m,
            [],
            n,
            int(m.get("rows", 0)),
            int(m.get("errors", 0)),
            size,
        )
    done, total, markers = committed_progress(run)
    if total is not None:
        status = f"in progress: {done} of {total} shards committed"
    else:
        status = f"in progress: {done} shards committed (total unknown)"
    rows, errors = sum(m.get("rows", 0) for m in markers), sum(m.get("errors", 0) for m in markers)
    return RunStatus(fp, False, status, None, markers, total, rows, errors, size)


def run_line(run) -> str:
    """`<fingerprint>  <status>  rows ..  errors ..  <size>` of one stage run folder."""
    s = run_status(run)
    return f"{s.fingerprint}  {s.status}  rows {s.rows}  errors {s.errors}  {s.size}"


def committed_progress(run) -> tuple[int, int | None, list[dict]]:
    """(shards committed, shards planned or None, their markers) of an unfinished stage run. The plan is made
    again from the run's config.json (planning reads upstream manifests only) and used when its fingerprint
    is the run's; else the markers of this fingerprint are counted."""
    from dp2o.storage import MARKERS, read_marker

    c = run.read_json("config.json")
    fp = c.get("fingerprint")
    try:
        stage = registry.get(c["stage"])
        cfg = stage.config.model_validate(c["config"])
        inputs = {i.name: (c.get("upstream", {}).get(i.stage) or {}).get("url") for i in stage.inputs}
        plan = stage.plan(cfg, inputs, run.url, storage_options=run.storage_options)
    except Exception:  # another version's config, an upstream gone: count what is committed
        plan = None
    if plan is not None and plan.fingerprint == fp:
        names, total = [sp.name for sp in plan.shards], len(plan.shards)
    else:
        names, total = [n[: -len(".json")] for n in run.listdir(MARKERS) if n.endswith(".json")], None
    markers = [m for n in names if (m := read_marker(run, n, fingerprint=fp)) is not None]
    return len(markers), total, markers


def folder_bytes(run) -> int | None:
    try:
        return int(run.fs.du(run.path, total=True))
    except Exception:
        return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "size ?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
