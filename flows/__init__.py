"""Prefect flows: one per stage plus the end-to-end `pipeline`. All logic lives in `dp2o`; flows only plan,
skip committed shards, map tasks and finalise."""

from flows.pipeline import pipeline
from flows.stages import degrade, pairs, reward, sample, score, train

__all__ = ["degrade", "pairs", "pipeline", "reward", "sample", "score", "train"]
