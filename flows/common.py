"""The Prefect executor of `dp2o.driver.run_stage`: the driver's shard map becomes a map of Prefect tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from prefect.futures import as_completed

from dp2o import driver, stopping
from dp2o.config import RayConfig
from dp2o.driver import StageResult
from dp2o.plan import StagePlan
from dp2o.progress import ProgressLog
from flows.artifacts import Progress, publish_stage, tracked
from tasks import finalize_task, run_all_task, run_shard_task

#: the Prefect task that runs each driver function
_TASKS = {driver.run_shard: run_shard_task, driver.run_all: run_all_task}


def map_tasks(fn, calls, concurrency, on_result: Callable[[Any], None] | None = None):
    """`driver.MapShards` with Prefect tasks, at most `concurrency` in flight (the stage's rule, not the
    flow's task runner, decides how many shards run at once). `on_result(result)` is called as each task
    completes, in completion order; the results come back in the order of `calls`."""
    task = _TASKS[fn]
    progress = ProgressLog(calls[0][0].stage, len(calls)) if calls else None
    results: list[Any] = [None] * len(calls)
    index: dict[Any, int] = {}

    def collect(limit: int) -> None:
        # wait until at most `limit` tasks are in flight, taking whichever completes first
        while len(index) > limit:
            done = as_completed(list(index))
            future = next(done)
            done.close()
            results[index.pop(future)] = r = future.result()
            progress.update(r)
            if on_result is not None:
                on_result(r)

    for i, args in enumerate(calls):
        collect(max(0, concurrency - 1))
        stopping.check()  # no new shard task after a stop request
        index[task.submit(*args)] = i
    collect(0)
    return results


def execute_with_prefect(
    plan: StagePlan,
    workers: int = 1,
    executor: Literal["local", "ray"] = "local",
    ray: RayConfig | None = None,
    shard_index: int | None = None,
    num_shards: int = 1,
    wait_seconds: float = 0.0,
) -> StageResult:
    """Run `plan` through the driver inside the current flow run: each shard (or the whole-dataset body) a
        Prefect task, or with executor="ray" fanned out over Ray workers from this flow run (the flow run is the
        Ray driver; Ray workers never call Prefect). Publishes the stage's artifacts (`flows.artifacts`): a progress artifact
    from the start, moved as shards commit, then the shards table, links and the stage's own descriptions."""
    if executor == "ray":
        from dp2o.ray_executor import RayExecutor

        map_shards = tracked(RayExecutor(ray), progress := Progress(plan), per_result=False)
    else:
        map_shards = tracked(map_tasks, progress := Progress(plan), per_result=True)
    result = driver.run_stage(
        plan,
        map_shards,
        workers=workers,
        finalize_fn=lambda p: finalize_task.submit(p).result(),
        partition=None if shard_index is None else (shard_index, num_shards),
        wait_seconds=wait_seconds,
    )
    if result.manifest:
        progress.finish()
        publish_stage(plan, result.manifest, progress.markers)
    return result
