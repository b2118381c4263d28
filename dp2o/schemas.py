"""What every stage's Parquet output carries besides its columns: the stage name and the schema version.

Each stage module defines its own explicit pyarrow schema next to the code that fills it (e.g.
`dp2o.sample.stage.sample_schema`), so every shard of a stage has identical columns and types, even a shard
whose rows are all errors, where inference from values would guess wrong.
"""

from __future__ import annotations

SCHEMA_VERSION = "1"


def stage_metadata(stage: str) -> dict[bytes, bytes]:
    """Schema metadata naming the stage that wrote a table and the schema version."""
    return {b"dp2o.stage": stage.encode(), b"dp2o.schema_version": SCHEMA_VERSION.encode()}
