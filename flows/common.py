"""Running a `dp2o.stages.StagePlan` with Prefect tasks (the Prefect counterpart of `dp2o.runner.execute_plan`)."""

from __future__ import annotations

import time

from prefect import get_run_logger, unmapped

from dp2o import stages
from dp2o.runner import StageResult
from dp2o.stages import StagePlan
from tasks import finalize_task, run_shard_task, run_single_task


def execute_with_prefect(plan: StagePlan) -> StageResult:
    """prepare → map run_shard_task over pending shards → finalize (inside the current flow run)."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    pending = stages.pending_shards(plan)
    stages.prepare(plan, pending)
    skipped = len(plan.shards) - len(pending)
    logger.info(
        "%s: %d shard(s) to compute, %d already committed -> %s",
        plan.stage,
        len(pending),
        skipped,
        plan.out_url,
    )
    if plan.single_task:
        if pending:
            run_single_task.submit(plan, pending).result()
    elif pending:
        futures = run_shard_task.map(unmapped(plan), pending)
        for f in futures:
            f.result()
    manifest = finalize_task.submit(plan).result()
    return StageResult(plan.stage, plan.out_url, manifest, len(pending), skipped, time.perf_counter() - t0)
