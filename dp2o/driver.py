"""The one driver that runs a stage plan, for every executor, and the chaining of stages into a pipeline.

    pending shards -> prepare (config.json, preflight) -> run the shards through `map_shards` -> commit -> finalise

An executor only supplies `map_shards(fn, calls, concurrency)`: run `fn(*args)` for every `args` in `calls`,
at most `concurrency` at a time in one process, and return the results in order. `fn` is a module-level
function of this module (`run_shard`, or `run_all` for whole-dataset stages) and every argument is plain data
(plan, shard specs), so the local executor calls it in a loop or a thread pool, the Prefect one maps it as a
task, and a distributed one ships it to workers. Only the driver commits, so every executor gets the same commit protocol (files moved into
place, re-checked, marker written last) and the same checks on finalising.

The design choice a reader would miss: concurrency is a property of the stage (`Stage.concurrent`), applied
here, so no executor can run a shared-model stage in threads because a caller passed `workers=4`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dp2o import registry, stopping
from dp2o.config import PipelineConfig, canonical
from dp2o.errors import StageError
from dp2o.plan import ShardSpec, StagePlan, pending_shards
from dp2o.progress import ProgressLog
from dp2o.storage import MANIFEST, commit_shard, now_iso, read_marker, reclaim_scratch

log = logging.getLogger("dp2o")

#: map_shards(fn, calls, concurrency) -> [fn(*args) for args in calls], in any execution order
MapShards = Callable[[Callable[..., Any], Sequence[tuple], int], list]


@dataclass
class StageResult:
    stage: str
    url: str
    manifest: dict
    computed: int
    skipped: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The JSON-able report the CLI prints and the stage flows return."""
        m = self.manifest
        return {
            "stage": self.stage,
            "url": self.url,
            "rows": m.get("rows"),
            "errors": m.get("errors"),
            "computed": self.computed,
            "skipped": self.skipped,
            "stats": m.get("stats"),
            "finished": bool(m),  # False: a partition whose other shards are still being computed elsewhere
        }


def map_locally(fn: Callable[..., Any], calls: Sequence[tuple], concurrency: int) -> list:
    """The local executor: a loop, or a thread pool when the stage allows concurrency. After a stop request no
    further shard starts (queued ones raise `Stopped` at once) and running ones stop at their next check."""
    progress = ProgressLog(calls[0][0].stage, len(calls)) if calls else None

    def call(args: tuple) -> Any:
        stopping.check()
        result = fn(*args)
        progress.update(result)
        return result

    if concurrency > 1 and len(calls) > 1:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(call, calls))
    return [call(args) for args in calls]


def concurrency_of(stage_name: str, workers: int) -> int:
    """How many shards of a stage may run at once in one process: `workers` where the stage allows it, else 1."""
    stage = registry.get(stage_name)
    return max(1, workers) if stage.concurrent and not stage.whole_dataset else 1


# ---- the steps ---------------------------------------------------------------------------------------------------


def prepare(plan: StagePlan, pending: list[ShardSpec]) -> None:
    """Write config.json (refusing a folder that holds another config's results) and, when there is work left,
    run the stage's preflight (loads models/metrics now: missing weights fail before any image is read)."""
    out = plan.out
    if out.exists("config.json"):
        old = out.read_json("config.json")
        if old.get("fingerprint") != plan.fingerprint:
            raise StageError(
                f"{plan.out_url} already holds {old.get('stage')} results of another config "
                f"(fingerprint {old.get('fingerprint')}, now {plan.fingerprint}); choose another output folder"
            )
    else:
        resolved = {
            "stage": plan.stage,
            "fingerprint": plan.fingerprint,
            "config": canonical(plan.config),
            "upstream": plan.upstream,
        }
        out.write_json_atomic(resolved, "config.json")
    reclaim_scratch(out)  # leftovers of dead runs (SIGKILL), never a live worker's
    stage = registry.get(plan.stage)
    if pending and stage.preflight is not None:
        stage.preflight(plan.config)


def run_shard(plan: StagePlan, spec: ShardSpec) -> dict:
    """Compute and commit one shard of a shard-wise stage; returns its marker."""
    stopping.check()
    body = registry.get(plan.stage).run_shard
    t0 = time.perf_counter()
    out = plan.out
    with out.local_tmpdir() as tmp:
        result = body(plan, spec, Path(tmp))
        return commit_shard(out, result, fingerprint=plan.fingerprint, seconds=time.perf_counter() - t0)


def run_all(plan: StagePlan, specs: list[ShardSpec]) -> list[dict]:
    """Compute and commit the pending shards of a whole-dataset stage in one call; returns their markers."""
    if not specs:
        return []
    stopping.check()
    body = registry.get(plan.stage).run_all
    t0 = time.perf_counter()
    out = plan.out
    with out.local_tmpdir() as tmp:
        results = body(plan, specs, Path(tmp))
        seconds = (time.perf_counter() - t0) / max(1, len(results))
        return [commit_shard(out, r, fingerprint=plan.fingerprint, seconds=seconds) for r in results]


def default_combine(key: str, old: Any, new: Any) -> Any:
    """Merge one per-shard statistic into the stage total: min/max for *_min/*_max, sums for other numbers,
    the last value for anything else."""
    if old is None:
        return new
    if new is None:
        return old
    if key.endswith("_min"):
        return min(old, new)
    if key.endswith("_max"):
        return max(old, new)
    if isinstance(new, int | float) and not isinstance(new, bool):
        return old + new
    return new


def finalize(plan: StagePlan) -> dict:
    """Write _MANIFEST.json once every shard has a valid marker; enforce max_failed_fraction."""
    out = plan.out
    markers = []
    for s in plan.shards:
        m = read_marker(out, s.name, fingerprint=plan.fingerprint)
        if m is None:
            raise StageError(
                f"{plan.stage}: shard {s.name} in {plan.out_url} is not committed; rerun the stage"
            )
        markers.append(m)
    rows = sum(m["rows"] for m in markers)
    errors = sum(m["errors"] for m in markers)
    limit = getattr(plan.config, "max_failed_fraction", None)
    if limit is not None and rows and errors / rows > limit:
        raise StageError(
            f"{plan.stage}: {errors} of {rows} rows failed ({errors / rows:.0%}) > max_failed_fraction={limit}; "
            f"see the `error` column of {plan.out_url}/data/*.parquet"
        )
    combine = registry.get(plan.stage).combine or default_combine
    stats: dict[str, Any] = {}
    for m in markers:
        for k, v in m.get("stats", {}).items():
            stats[k] = combine(k, stats.get(k), v)
    manifest = {
        "stage": plan.stage,
        "fingerprint": plan.fingerprint,
        "config": canonical(plan.config),
        "upstream": plan.upstream,
        "shards": [
            {"name": m["shard"], "files": m["files"], "rows": m["rows"], "errors": m["errors"]}
            for m in markers
        ],
        "rows": rows,
        "errors": errors,
        "stats": stats,
        "created": now_iso(),
    }
    out.write_json_atomic(manifest, MANIFEST)
    reclaim_scratch(out)  # never the live scratch of another worker on this stage
    return manifest


def run_stage(
    plan: StagePlan,
    map_shards: MapShards = map_locally,
    *,
    workers: int = 1,
    finalize_fn: Callable[[StagePlan], dict] = finalize,
    partition: tuple[int, int] | None = None,
    wait_seconds: float = 0.0,
) -> StageResult:
    """pending -> prepare -> map the shard (or whole-dataset) body -> commit -> finalise. The one driver.

    partition=(i, n): this process is one of n sharing the stage; it computes only pending shards whose index
    is i mod n (a whole-dataset stage: only partition 0), and finalises only once every shard is committed,
    whoever committed it. A partition that finishes first waits up to `wait_seconds` for the others (polling
    the markers), so a pipeline can go on to the next stage; with 0 it returns without a manifest.
    """
    t0 = time.perf_counter()
    stopping.check()
    stopping.track(plan.stage, plan.out_url, lambda: committed_count(plan))
    pending = pending_shards(plan)
    prepare(plan, pending)
    skipped = len(plan.shards) - len(pending)
    whole = registry.get(plan.stage).whole_dataset
    mine = pending
    if partition is not None:
        i, n = partition
        mine = ([] if i else pending) if whole else [s for s in pending if s.index % n == i]
    log.info(
        "%s: %d shard(s) to compute here, %d already committed -> %s",
        plan.stage,
        len(mine),
        skipped,
        plan.out_url,
    )
    # tasks get only what they need: their own shard (degrade shards carry source lists), never the whole plan
    if mine and whole:
        map_shards(run_all, [(plan.slim(), mine)], 1)
    elif mine:
        map_shards(run_shard, [(plan.only(spec), spec) for spec in mine], concurrency_of(plan.stage, workers))
    if partition is not None and not _wait_for_others(plan, wait_seconds):
        missing = len(pending_shards(plan))
        log.info(
            "%s: %d shard(s) left to other workers; the last one to finish writes the manifest",
            plan.stage,
            missing,
        )
        return StageResult(plan.stage, plan.out_url, {}, len(mine), skipped, time.perf_counter() - t0)
    manifest = finalize_fn(plan.slim())
    return StageResult(plan.stage, plan.out_url, manifest, len(mine), skipped, time.perf_counter() - t0)


def _wait_for_others(plan: StagePlan, seconds: float, poll: float = 2.0) -> bool:
    """True once every shard of `plan` is committed (by any worker), polling for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while pending_shards(plan):
        if time.monotonic() >= deadline:
            return False
        stopping.wait(poll)
    return True


def committed_count(plan: StagePlan) -> tuple[int, int]:
    """(shards with a valid marker, shards planned) of a stage plan."""
    return len(plan.shards) - len(pending_shards(plan)), len(plan.shards)


def executor_for(cfg: PipelineConfig) -> MapShards:
    """The shard map a pipeline config asks for: this process, or a Ray cluster."""
    if cfg.executor == "ray":
        from dp2o.ray_executor import RayExecutor

        return RayExecutor(cfg.ray)
    return map_locally


def partition_of(cfg: PipelineConfig) -> tuple[int, int] | None:
    return None if cfg.shard_index is None else (cfg.shard_index, cfg.num_shards)


# ---- the pipeline ------------------------------------------------------------------------------------------------

Executor = Callable[[StagePlan], StageResult]
#: how long a partitioned pipeline process waits for the other partitions to finish a stage before it fails
PARTITION_WAIT_SECONDS = 24 * 3600.0


def stage_config(cfg: PipelineConfig, stage: registry.Stage) -> Any:
    return getattr(cfg, stage.section)


def preflight(cfg: PipelineConfig, until: str | None = None) -> None:
    """Load every model and metric the chain up to `until` needs before the first stage runs, so a missing
    weight folder fails in seconds, not after hours of degradation (each preflight caches what it loads)."""
    for stage in pipeline_until(until):
        if stage.preflight is not None:
            stage.preflight(stage_config(cfg, stage))


def pipeline_until(until: str | None) -> list[registry.Stage]:
    chain = registry.pipeline_stages()
    if until is None:
        return chain
    names = [s.name for s in chain]
    if until not in names:
        raise StageError(f"until={until!r} is not a pipeline stage; choose one of {', '.join(names)}")
    return chain[: names.index(until) + 1]


def run_pipeline(
    cfg: PipelineConfig, execute: Executor | None = None, *, until: str | None = None
) -> dict[str, StageResult]:
    """Every pipeline stage in registry order under `cfg.root`, each fed by its upstream stages' outputs; each
    skips committed shards. until: stop after this stage (e.g. "pairs")."""
    if execute is None:
        map_shards = executor_for(cfg)

        def execute(plan: StagePlan) -> StageResult:
            return run_stage(
                plan,
                map_shards,
                workers=cfg.workers,
                partition=partition_of(cfg),
                wait_seconds=PARTITION_WAIT_SECONDS,
            )

    chain = pipeline_until(until)
    preflight(cfg, until)
    results: dict[str, StageResult] = {}
    for stage in chain:
        inputs = {i.name: results[i.stage].url if i.stage in results else None for i in stage.inputs}
        plan = stage.plan(
            stage_config(cfg, stage),
            inputs,
            root=cfg.root,
            storage_options=cfg.storage_options,
            runtime=stage.runtime_of(cfg) if stage.runtime_of else None,
        )
        results[stage.name] = result = execute(plan)
        if not result.manifest:
            raise StageError(
                f"{stage.name}: other workers did not finish its shards in time; rerun this process to go on"
            )
    return results


def run_record(results: dict[str, StageResult], wall_seconds: float | None = None) -> dict:
    """The structured form of a pipeline run (plain JSON data, what the Prefect flow returns and persists):
    per stage its fingerprint, folder, status, shards, rows, errors and seconds, plus `summary`'s text."""
    stages = {}
    for name, r in results.items():
        m = r.manifest
        stages[name] = {
            "fingerprint": m.get("fingerprint") or r.url.rstrip("/").rsplit("/", 1)[-1],
            "url": r.url,
            "status": "finished" if m else "waiting for other partitions",
            "shards": len(m.get("shards", [])) if m else r.computed + r.skipped,
            "computed": r.computed,
            "skipped": r.skipped,
            "rows": m.get("rows"),
            "errors": m.get("errors"),
            "seconds": round(r.seconds, 3),
        }
    return {
        "stages": stages,
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 3),
        "summary": summary(results, wall_seconds),
    }


def summary(results: dict[str, StageResult], wall_seconds: float | None = None) -> str:
    """A one-screen report: where each stage wrote, rows, errors, and each stage's own lines."""
    lines = ["", "dp2o run summary", "=" * 78]
    lines.append(f"{'stage':<8} {'rows':>8} {'errors':>7} {'shards':>9} {'time':>7}  output")
    for name, r in results.items():
        m = r.manifest
        shards = f"{r.computed}+{r.skipped}c"
        lines.append(f"{name:<8} {m['rows']:>8} {m['errors']:>7} {shards:>9} {r.seconds:>6.1f}s  {r.url}")
    lines.append("-" * 78)
    for name, r in results.items():
        stage = registry.get(name)
        if stage.summarize is not None:
            lines.extend(stage.summarize({**r.manifest, "url": r.url}))
    lines.append("(shards column: computed + already-committed (c); committed shards are never recomputed)")
    if wall_seconds is not None:
        lines.append(f"wall time: {wall_seconds:.1f}s")
    return "\n".join(lines)
