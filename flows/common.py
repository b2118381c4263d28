"""The Prefect executor of `dp2o.driver.run_stage`: the driver's shard map becomes a map of Prefect tasks."""

from __future__ import annotations

from typing import Literal

from dp2o import driver
from dp2o.config import RayConfig
from dp2o.driver import StageResult
from dp2o.plan import StagePlan
from tasks import finalize_task, run_all_task, run_shard_task

#: the Prefect task that runs each driver function
_TASKS = {driver.run_shard: run_shard_task, driver.run_all: run_all_task}


def map_tasks(fn, calls, concurrency):
    """`driver.MapShards` with Prefect tasks, at most `concurrency` in flight (the stage's rule, not the
    flow's task runner, decides how many shards run at once)."""
    task = _TASKS[fn]
    futures, results = [], []
    for args in calls:
        if len(futures) - len(results) >= concurrency:
            results.append(futures[len(results)].result())
        futures.append(task.submit(*args))
    results.extend(f.result() for f in futures[len(results) :])
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
    Ray driver; Ray workers never call Prefect)."""
    if executor == "ray":
        from dp2o.ray_executor import RayExecutor

        map_shards = RayExecutor(ray)
    else:
        map_shards = map_tasks
    return driver.run_stage(
        plan,
        map_shards,
        workers=workers,
        finalize_fn=lambda p: finalize_task.submit(p).result(),
        partition=None if shard_index is None else (shard_index, num_shards),
        wait_seconds=wait_seconds,
    )
