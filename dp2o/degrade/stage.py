"""The degrade stage: HR photos -> random crops -> Real-ESRGAN-style degradation -> LR/HR webdataset shards.

Shards group `images_per_shard` source files; each crop's position and degradation parameters derive from
(seed, sample id), so a shard's output does not depend on which worker runs it or when. Shards are
independent and CPU-bound, so they may run in parallel threads.

The design choice a reader would miss: bundled photos enter the fingerprint by their `bundled://` name, not by
where the installed packages keep them, so another clone or a recreated virtual environment reuses outputs.
"""

from __future__ import annotations

import re
from hashlib import sha1
from pathlib import Path
from typing import Any

import pyarrow as pa

from dp2o import stopping
from dp2o.config import DegradeConfig, fingerprint
from dp2o.data import BUNDLED_SCHEME, is_bundled
from dp2o.errors import StageError
from dp2o.plan import ShardSpec, StagePlan, listing_hash, out_url
from dp2o.progress import within
from dp2o.registry import Flag, Input, Stage
from dp2o.schemas import Column, documented_schema
from dp2o.seeding import derive_seed
from dp2o.storage import ShardOutput, shard_name

_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def source_sample_id(relpath: str) -> str:
    """Readable, unique, dot-free id for a source file: sanitised stem + 8 hex digits of its path's hash."""
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    readable = _SAFE.sub("_", stem).strip("_")[-40:] or "img"
    return f"{readable}-{sha1(relpath.encode()).hexdigest()[:8]}"


def source_listing(input_url: str, sources) -> str:
    """Hash naming the HR sources (bundled photos by their `bundled://` name, other files by URL)."""
    if is_bundled(input_url):
        return listing_hash(f"{BUNDLED_SCHEME}{s.relpath}" for s in sources)
    return listing_hash(f"{s.uri}|{s.member or ''}" for s in sources)


#: docs of the degrade table's own columns (the degradation parameters' come from `params_column_docs`)
COLUMNS = {
    "crop_x": Column("left edge of the HR crop in the source photo", "px"),
    "crop_y": Column("top edge of the HR crop in the source photo", "px"),
    "scale": Column("HR/LR size ratio of this pair", ""),
}


def degrade_schema() -> pa.Schema:
    from dp2o.degrade.params import params_arrow_fields, params_column_docs

    columns = {**COLUMNS, **{n: Column(d, u) for n, (d, u) in params_column_docs().items()}}

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
    return documented_schema("degrade", fields, columns)


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


def plan(cfg: DegradeConfig, inputs, out, *, root, storage_options, runtime) -> StagePlan:
    from dp2o.degrade.ingest import list_sources

    url = inputs.get("source") or cfg.input
    if url != cfg.input:
        cfg = cfg.model_copy(update={"input": url})
    sources = list_sources(url, storage_options=storage_options)
    if not sources:
        raise StageError(f"degrade.input={url!r}: no image files found there")
    listing = source_listing(url, sources)
    fp = fingerprint("degrade", cfg, [listing])
    refs = [(s.uri, s.relpath, s.member) for s in sources]
    n = cfg.images_per_shard
    shards = [
        ShardSpec(i, shard_name(i), tuple(refs[j : j + n])) for i, j in enumerate(range(0, len(refs), n))
    ]
    return StagePlan(
        "degrade",
        fp,
        out_url(out, root, "degrade", fp),
        cfg,
        shards,
        upstream={"source": {"url": url, "fingerprint": listing, "files": len(refs)}},
        storage_options=storage_options,
    )


def run_shard(plan: StagePlan, spec: ShardSpec, tmp: Path) -> ShardOutput:
    import numpy as np
    import torch

    from dp2o.degrade.crops import crop_and_params
    from dp2o.degrade.ingest import ImageRejected, SourceRef, load_hr
    from dp2o.degrade.pipeline import degrade_batch
    from dp2o.tario import encode_png, image_shard

    cfg: DegradeConfig = plan.config
    scale = cfg.degradation.scale
    rows: list[dict] = []
    jobs: list[tuple[str, Any, Any]] = []  # (sample_id, hr crop uint8 HWC, params)
    for uri, relpath, member in spec.inputs:
        stopping.check()
        base = source_sample_id(relpath)
        ref = SourceRef(uri=uri, relpath=relpath, member=member)
        try:
            img = load_hr(ref, min_size=cfg.min_size or cfg.crop_size, storage_options=plan.storage_options)
            if min(img.shape[:2]) < cfg.crop_size:
                raise ImageRejected(
                    f"{relpath}: {img.shape[1]}x{img.shape[0]} is smaller than crop_size={cfg.crop_size}"
                )
        except ImageRejected as e:
            rows.append(degrade_error_row(f"{base}-c00", relpath, scale, str(e)))
            continue
        for k in range(cfg.crops_per_image):
            sid = f"{base}-c{k:02d}"
            seed = derive_seed(cfg.seed, "degrade", sid)
            y, x, params = crop_and_params(img.shape[0], img.shape[1], cfg.crop_size, cfg.degradation, seed)
            jobs.append((sid, img[y : y + cfg.crop_size, x : x + cfg.crop_size], params))
            rows.append(
                {
                    "sample_id": sid,
                    "source": relpath,
                    "crop_x": x,
                    "crop_y": y,
                    "scale": scale,
                    "seed": seed,
                    "status": "ok",
                    "error": None,
                    **params.to_row(),
                }
            )
    members: list[tuple[str, bytes]] = []
    bs, n = cfg.batch_size, len(jobs)
    for i in within(f"degrade {spec.name}", n, "crops").over(range(0, n, bs), lambda i: min(bs, n - i)):
        stopping.check()
        chunk = jobs[i : i + cfg.batch_size]
        hr = torch.from_numpy(np.stack([c for _, c, _ in chunk])).permute(0, 3, 1, 2).contiguous()
        hr_t, lr = degrade_batch(hr, [p for _, _, p in chunk], cfg.degradation, device=cfg.device)
        hr_np = hr_t.permute(0, 2, 3, 1).numpy()
        lr_np = lr.permute(0, 2, 3, 1).numpy()
        for j, (sid, _, _) in enumerate(chunk):
            members.append((f"{sid}.hr.png", encode_png(hr_np[j])))
            members.append((f"{sid}.lr.png", encode_png(lr_np[j])))
    shard = image_shard(spec.name, tmp, pa.Table.from_pylist(rows, schema=degrade_schema()), members)
    shard.stats = {"samples_ok": shard.rows - shard.errors, "sources": len(spec.inputs), "device": cfg.device}
    return shard


def summarize(m: dict) -> list[str]:
    st = m["stats"]
    return [
        f"degrade: {st.get('sources', 0)} source files, {st.get('samples_ok', 0)} LR/HR pairs, "
        f"{m['errors']} rejected (see `error` column)"
    ]


STAGE = Stage(
    name="degrade",
    version=2,
    config=DegradeConfig,
    section="degrade",
    inputs=(
        Input(
            "source",
            None,
            "--input",
            "HR source: folder, fsspec URL, webdataset .tar shards, or bundled://train (default: degrade.input)",
            required=False,
        ),
    ),
    planner=plan,
    description="HR photos -> LR/HR webdataset shards + Parquet index",
    run_shard=run_shard,
    concurrent=True,
    resources="cpu",
    summarize=summarize,
    flags=(Flag("--crop-size", "crop_size", "HR crop side (multiple of 4)", int),),
)
