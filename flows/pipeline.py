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
    return flow(name=f"{stage}-stage", log_prints=True)(execute_with_prefect)


_SUBFLOWS = {s: _stage_subflow(s) for s in ("degrade", "sample", "score", "reward", "pairs", "train")}
#: stages whose shards may run in parallel threads; sample and score share one model per process
_PARALLEL = ("degrade",)


@flow(name="dp2o-pipeline", log_prints=True)
def pipeline(config: PipelineConfig, until: str | None = None) -> str:
    """Run every stage under config.root; committed shards are skipped. Returns the one-screen summary."""
    t0 = time.perf_counter()

    def execute(plan: StagePlan) -> StageResult:
        workers = config.workers if plan.stage in _PARALLEL else 1
        runner = ThreadPoolTaskRunner(max_workers=workers)
        return _SUBFLOWS[plan.stage].with_options(task_runner=runner)(plan)

    results = run_pipeline(config, execute, until=until)
    text = summary(results, time.perf_counter() - t0)
    print(text)
    return text
