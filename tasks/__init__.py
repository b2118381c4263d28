"""Thin Prefect tasks: each calls one function of `dp2o.driver` and passes only plans, shard specs and URLs.

Markers in storage are the cache (a shard with a valid marker is never recomputed), so Prefect's own caching
is off: its default key contains the run id, and a key on task source alone is blind to changes in `dp2o/`.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from dp2o import driver, stopping
from dp2o.plan import ShardSpec, StagePlan


def _shard_run_name() -> str:
    from prefect.runtime import task_run

    params = task_run.parameters
    return f"{params['plan'].stage}-{params['spec'].name}"


def _unless_stopping(task, task_run, state) -> bool:
    """Retry a failed shard unless the run is stopping (its `Stopped` error is no failure to retry)."""
    return not stopping.requested()


@task(
    cache_policy=NONE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_unless_stopping,
    task_run_name=_shard_run_name,
)
def run_shard_task(plan: StagePlan, spec: ShardSpec) -> dict:
    """Compute and commit one shard (retried once: a shard rewrite is idempotent; not when stopping)."""
    return driver.run_shard(plan, spec)


@task(cache_policy=NONE, persist_result=False, task_run_name="{plan.stage}-all")
def run_all_task(plan: StagePlan, specs: list[ShardSpec]) -> list[dict]:
    """A whole-dataset stage (reward, pairs, train, ...) as one task over its pending shards."""
    return driver.run_all(plan, specs)


@task(cache_policy=NONE, persist_result=False, task_run_name="{plan.stage}-finalize")
def finalize_task(plan: StagePlan) -> dict:
    return driver.finalize(plan)
