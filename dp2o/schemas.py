"""What every stage's Parquet output carries besides its columns: the stage that wrote it, the schema version,
and for each column a description, its unit, and for quality scores which direction is better.

Each stage module defines its own explicit pyarrow schema next to the code that fills it (e.g.
`dp2o.sample.stage.sample_schema`), so every shard of a stage has identical columns and types, even a shard
whose rows are all errors, where inference from values would guess wrong. Before writing, a stage passes its
table through `documented(table, stage, columns)` with its own column docs (`Column`); the columns every stage
shares (`COMMON`) are documented here. Readers get them back with `column_docs(schema)`:

    >>> column_docs(pq.read_schema("runs/demo/score/<fp>/data/shard-00000.parquet"))["psnr"]
    {'description': 'PSNR ... (full-reference: fidelity to the HR crop)', 'unit': 'dB', 'better': 'higher'}

Field metadata keys: `description`, `unit` ("" = dimensionless), `better` ("higher" / "lower"; absent for columns
that are not quality scores). Schema metadata: `dp2o.stage`, `dp2o.schema_version`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class Column:
    """One column's documentation: what it holds, its unit, and for a quality score which way is better."""

    description: str
    unit: str = ""
    better: str = ""  # "higher" | "lower" | "" (not a quality score)

    def metadata(self) -> dict[bytes, bytes]:
        md = {b"description": self.description.encode(), b"unit": self.unit.encode()}
        if self.better:
            md[b"better"] = self.better.encode()
        return md


#: columns with the same meaning in every stage that has them
COMMON: dict[str, Column] = {
    "sample_id": Column(
        "id of the LR/HR input: photo stem, hash of its path, -c and the crop index; joins every stage's tables"
    ),
    "candidate": Column("index of the candidate among the M generated for this input (0..M-1)"),
    "seed": Column("random seed of this row (degrade: crop and degradation; sample: the candidate's noise)"),
    "status": Column("ok, or error: the row was kept with its error instead of failing the shard"),
    "error": Column("what went wrong for this row (null when status is ok)"),
    "source": Column("the HR photo this input was cropped from (URL, bundled:// name, or tar#member)"),
}


def stage_metadata(stage: str) -> dict[bytes, bytes]:
    """Schema metadata naming the stage that wrote a table and the schema version."""
    return {b"dp2o.stage": stage.encode(), b"dp2o.schema_version": SCHEMA_VERSION.encode()}


def documented_schema(stage: str, fields: Iterable, columns: Mapping[str, Column] | None = None) -> pa.Schema:
    """A schema of `fields` with `stage` in its metadata and each column's doc (`columns`, else `COMMON`) in
    its field metadata. A column with no doc keeps none: the tests check every column a stage writes has one."""
    columns = columns or {}
    out = []
    for f in pa.schema(list(fields)):  # pa.Field or (name, type) tuples
        doc = columns.get(f.name) or COMMON.get(f.name)
        out.append(f.with_metadata(doc.metadata()) if doc else f)
    return pa.schema(out, metadata=stage_metadata(stage))


def documented(table: pa.Table, stage: str, columns: Mapping[str, Column] | None = None) -> pa.Table:
    """`table` with the schema of `documented_schema`; values untouched (a metadata-only cast)."""
    return table.cast(documented_schema(stage, table.schema, columns))


def column_docs(schema: pa.Schema) -> dict[str, dict[str, str]]:
    """{column: {"description", "unit"[, "better"]}} read back from a written table's schema."""
    out = {}
    for f in schema:
        md = f.metadata or {}
        out[f.name] = {
            k.decode(): v.decode() for k, v in md.items() if k in (b"description", b"unit", b"better")
        }
    return out
