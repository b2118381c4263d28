"""Prefect flows, derived from the stage registry: one per stage (`stage_flow(name)`, or `flows.<name>`) plus
the end-to-end `pipeline`. All logic lives in `dp2o`; flows only plan, map tasks and finalise."""

from flows.pipeline import pipeline
from flows.stages import stage_flow


def __getattr__(name: str):
    if name.startswith("_"):
        raise AttributeError(name)
    from dp2o.errors import StageError

    try:
        return stage_flow(name)
    except StageError:
        raise AttributeError(f"module 'flows' has no attribute {name!r}") from None


__all__ = ["pipeline", "stage_flow"]
