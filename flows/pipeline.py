"""The end-to-end flow: degrade → sample → score → reward → pairs → train, each stage a subflow."""

from __future__ import annotations

import time

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from dp2o.config import PipelineConfig
from dp2o.runner import StageResult, run_pipeline, summary
from dp2o.stages import StagePlan
from flows.common import execute_with_prefect


def _stage_subflow(stage: str):
    workers = 2 if stage == "degrade" else 1
    return flow(
        name=f"{stage}-stage", task_runner=ThreadPoolTaskRunner(max_workers=workers), log_prints=True
    )(execute_with_prefect)


_SUBFLOWS = {s: _stage_subflow(s) for s in ("degrade", "sample", "score", "reward", "pairs", "train")}


def _execute(plan: StagePlan) -> StageResult:
    return _SUBFLOWS[plan.stage](plan)


@flow(name="dp2o-pipeline", log_prints=True)
def pipeline(config: PipelineConfig, until: str | None = None) -> str:
    """Run every stage under config.root; committed shards are skipped. Returns the one-screen summary."""
    t0 = time.perf_counter()
    results = run_pipeline(config, _execute, until=until)
    text = summary(results, time.perf_counter() - t0)
    print(text)
    return text
