"""The end-to-end flow: every pipeline stage of the registry, in order, each stage a subflow."""

from __future__ import annotations

import functools
import time

from prefect import Flow, flow

from dp2o.config import PipelineConfig
from dp2o.driver import StageResult, run_pipeline, summary
from dp2o.plan import StagePlan
from flows.common import execute_with_prefect


@functools.cache
def stage_subflow(stage: str) -> Flow:
    """`<stage>-stage`: the subflow that runs one stage's plan inside the pipeline flow run."""
    return flow(name=f"{stage}-stage", log_prints=True)(execute_with_prefect)


@flow(name="dp2o-pipeline", log_prints=True)
def pipeline(config: PipelineConfig, until: str | None = None) -> str:
    """Run every stage under config.root; committed shards are skipped. Returns the one-screen summary."""
    t0 = time.perf_counter()

    def execute(plan: StagePlan) -> StageResult:
        return stage_subflow(plan.stage)(plan, workers=config.workers)

    results = run_pipeline(config, execute, until=until)
    text = summary(results, time.perf_counter() - t0)
    print(text)
    return text
