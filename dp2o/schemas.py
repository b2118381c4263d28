"""One explicit pyarrow schema per stage output, so every shard of a stage has identical columns and types
(even a shard whose rows are all errors, where inference from values would guess wrong)."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"


def _meta(stage: str) -> dict[bytes, bytes]:
    return {b"dp2o.stage": stage.encode(), b"dp2o.schema_version": SCHEMA_VERSION.encode()}


def degrade_schema() -> pa.Schema:
    from dp2o.degrade.params import params_arrow_fields

    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("crop_x", pa.int32()),
        pa.field("crop_y", pa.int32()),
        pa.field("scale", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        *params_arrow_fields(),
    ]
    return pa.schema(fields, metadata=_meta("degrade"))


def degrade_error_row(sample_id: str, source: str, scale: int, error: str) -> dict:
    return {
        "sample_id": sample_id,
        "source": source,
        "crop_x": None,
        "crop_y": None,
        "scale": scale,
        "seed": None,
        "status": "error",
        "error": error,
    }


def sample_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("candidate", pa.int32()),
            pa.field("seed", pa.int64()),
            pa.field("backend", pa.string()),
            pa.field("height", pa.int32()),
            pa.field("width", pa.int32()),
            pa.field("status", pa.string()),
            pa.field("error", pa.string()),
        ],
        metadata=_meta("sample"),
    )


def score_schema(metric_names: list[str]) -> pa.Schema:
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("candidate", pa.int32()),
            pa.field("seed", pa.int64()),
            pa.field("status", pa.string()),
            pa.field("error", pa.string()),
            *[pa.field(m, pa.float64()) for m in metric_names],
        ],
        metadata=_meta("score"),
    )
