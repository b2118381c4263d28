"""One Prefect flow per stage, each runnable alone with explicit input and output locations.

`out=None` writes to `<root>/<stage>/<fingerprint>/`; an explicit `out` is used as the stage folder itself.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from dp2o import stages
from dp2o.config import DegradeConfig, PairsConfig, SampleConfig, ScoreConfig, TrainConfig
from flows.common import execute_with_prefect


@flow(name="degrade", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def degrade(
    config: DegradeConfig,
    out: str | None = None,
    root: str = "runs",
    storage_options: dict[str, Any] | None = None,
) -> dict:
    """HR photos (config.input) -> LR/HR webdataset shards + Parquet index."""
    plan = stages.plan_degrade(config, out, root=root, storage_options=storage_options)
    return execute_with_prefect(plan).as_dict()


@flow(name="sample", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def sample(
    config: SampleConfig,
    degraded: str,
    out: str | None = None,
    root: str = "runs",
    storage_options: dict[str, Any] | None = None,
) -> dict:
    """M candidates per LR input of a finished degrade stage (one shard at a time: the model is shared)."""
    plan = stages.plan_sample(config, degraded, out, root=root, storage_options=storage_options)
    return execute_with_prefect(plan).as_dict()


@flow(name="score", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def score(
    config: ScoreConfig,
    samples: str,
    out: str | None = None,
    root: str = "runs",
    storage_options: dict[str, Any] | None = None,
) -> dict:
    """Raw IQA metrics for every candidate of a finished sample stage."""
    plan = stages.plan_score(config, samples, out, root=root, storage_options=storage_options)
    return execute_with_prefect(plan).as_dict()


@flow(name="reward", log_prints=True)
def reward(
    config: ScoreConfig,
    scores: str,
    out: str | None = None,
    root: str = "runs",
    storage_options: dict[str, Any] | None = None,
) -> dict:
    """Hybrid reward from stored raw scores (never re-scores)."""
    plan = stages.plan_reward(config, scores, out, root=root, storage_options=storage_options)
    return execute_with_prefect(plan).as_dict()


@flow(name="pairs", log_prints=True)
def pairs(
    config: PairsConfig,
    scores: str,
    out: str | None = None,
    root: str = "runs",
    storage_options: dict[str, Any] | None = None,
) -> dict:
    """Top-N x bottom-N pairs with HPO weights from a reward stage or any Parquet with sample_id/candidate/reward."""
    plan = stages.plan_pairs(config, scores, out, root=root, storage_options=storage_options)
    return execute_with_prefect(plan).as_dict()


@flow(name="train", log_prints=True)
def train(
    config: TrainConfig,
    pairs: str,
    samples: str | None = None,
    out: str | None = None,
    root: str = "runs",
    storage_options: dict[str, Any] | None = None,
) -> dict:
    """Weighted Diffusion-DPO of the sampling backend on a finished pairs stage; resumes from checkpoints."""
    plan = stages.plan_train(
        config, pairs, out, root=root, samples_url=samples, storage_options=storage_options
    )
    return execute_with_prefect(plan).as_dict()
