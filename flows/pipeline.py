"""The end-to-end flow: every pipeline stage of the registry, in order, each stage a subflow."""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow

from dp2o import registry
from dp2o.config import PipelineConfig, apply_overrides
from dp2o.driver import PARTITION_WAIT_SECONDS, StageResult, run_pipeline, run_record
from dp2o.plan import StagePlan
from dp2o.report import report_after_run
from dp2o.stopping import Stopped
from flows.artifacts import publish_run
from flows.cancel import stoppable
from flows.common import execute_with_prefect


def run_stage_subflow(plan: StagePlan, **options) -> StageResult:
    """Run one stage's plan as a subflow `<stage>-stage` of the current flow run.

    The plan is not a parameter of the subflow: Prefect stores every parameter in its database, and a degrade
    plan carries the reference of every source photo (megabytes at paper scale). The subflow run is named
    after the stage and its fingerprint instead, and each shard task gets only its own shard.

    A stopped stage (`dp2o.stopping`) ends its subflow run Cancelled and raises its `Stopped` error here, so
    the pipeline stops too."""
    stopped: list[Stopped] = []

    def stage_run() -> StageResult:
        return stoppable(lambda: execute_with_prefect(plan, **options), on_stopped=stopped.append)

    stage_run.__name__ = f"{plan.stage}_stage"
    sub = flow(
        name=f"{plan.stage}-stage",
        flow_run_name=f"{plan.stage}-{plan.fingerprint}",
        log_prints=True,
        persist_result=False,  # the pipeline's record holds what the UI needs; a manifest can be large
    )
    state = sub(stage_run)(return_state=True)
    if stopped:
        raise stopped[0]
    return state.result()


#: the stages `until` may name, as an enum in the flow's parameter schema (a typo cannot run the whole chain)
PipelineStage = Literal[tuple(s.name for s in registry.pipeline_stages())]


@flow(name="dp2o-pipeline", log_prints=True, persist_result=True, result_serializer="json")
def pipeline(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - a frozen model: the UI form shows its defaults
    until: PipelineStage | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Run every stage under config.root; committed shards are skipped. Returns the run's record: per stage its
    fingerprint, folder, status, shards, rows, errors and seconds, and the one-screen summary (`summary`),
    persisted as JSON in Prefect's result storage.

    Args:
        config: the pipeline config (the deployment's, as the form shows it)
        until: stop after this stage
        overrides: dotted KEY=VALUE changes merged over `config`, as with the CLI's --set (e.g.
            sample.num_candidates=16), so one value changes without passing the whole config
    """
    config = apply_overrides(config, overrides)
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

    def run() -> dict:
        results = run_pipeline(config, execute, until=until)
        record = run_record(results, time.perf_counter() - t0)
        record["report"] = report_after_run(config.root, config.storage_options)
        print(record["summary"])
        if record["report"]:
            print(f"report: {record['report']}")
        publish_run(config.root, record)
        return record

    return stoppable(run)
