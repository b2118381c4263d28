"""The end-to-end flow: every pipeline stage of the registry, in order, each stage a subflow."""

from __future__ import annotations

import time

from prefect import flow

from dp2o.config import PipelineConfig
from dp2o.driver import PARTITION_WAIT_SECONDS, StageResult, run_pipeline, summary
from dp2o.plan import StagePlan
from flows.common import execute_with_prefect


def run_stage_subflow(plan: StagePlan, **options) -> StageResult:
    """Run one stage's plan as a subflow `<stage>-stage` of the current flow run.

    The plan is not a parameter of the subflow: Prefect stores every parameter in its database, and a degrade
    plan carries the reference of every source photo (megabytes at paper scale). The subflow run is named
    after the stage and its fingerprint instead, and each shard task gets only its own shard."""

    def stage_run() -> StageResult:
        return execute_with_prefect(plan, **options)

    stage_run.__name__ = f"{plan.stage}_stage"
    sub = flow(name=f"{plan.stage}-stage", flow_run_name=f"{plan.stage}-{plan.fingerprint}", log_prints=True)
    return sub(stage_run)()


@flow(name="dp2o-pipeline", log_prints=True)
def pipeline(config: PipelineConfig, until: str | None = None) -> str:
    """Run every stage under config.root; committed shards are skipped. Returns the one-screen summary."""
    t0 = time.perf_counter()

    def execute(plan: StagePlan) -> StageResult:
        return run_stage_subflow(
            plan,
            workers=config.workers,
            executor=config.executor,
            ray=config.ray,
            shard_index=config.shard_index,
            num_shards=config.num_shards,
            wait_seconds=PARTITION_WAIT_SECONDS if config.shard_index is not None else 0.0,
        )

    results = run_pipeline(config, execute, until=until)
    text = summary(results, time.perf_counter() - t0)
    print(text)
    return text
