"""The sample stage: M candidates per LR input of a degrade stage, batched through one backend per process.

Each candidate's seed derives from (seed, sample id, candidate), so a candidate is the same whichever batch,
shard, worker or resume point computes it. Shards share the process's one loaded backend, whose sampler state
is mutated per call, so they never run in parallel threads (`concurrent=False`); scale out with processes or
GPUs instead.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pyarrow as pa

from dp2o import stopping
from dp2o.config import SampleConfig, fingerprint
from dp2o.plan import ShardSpec, StagePlan, Upstream, out_url
from dp2o.progress import within
from dp2o.registry import Flag, Input, Stage
from dp2o.schemas import Column, documented_schema
from dp2o.seeding import derive_seed
from dp2o.storage import ShardOutput, local_copy, read_parquet


def candidate_key(sample_id: str, candidate: int) -> str:
    """The tar member stem of one candidate: `<sample_id>_<candidate:03d>`."""
    return f"{sample_id}_{candidate:03d}"


def candidate_seeds(seed: int, sample_ids, num_candidates: int) -> list[tuple[str, int, int]]:
    """(sample id, candidate, seed) for every candidate, inputs first: the one place candidate seeds derive."""
    return [
        (sid, c, derive_seed(seed, "sample", sid, c)) for sid in sample_ids for c in range(num_candidates)
    ]


@functools.lru_cache(maxsize=2)
def _backend_cached(cfg_json: str):
    from dp2o.models import BackendConfig, build_backend

    return build_backend(BackendConfig.model_validate_json(cfg_json))


def sampling_backend(cfg: SampleConfig):
    """The backend for sampling, loaded once per process (weights are read-only while sampling)."""
    return _backend_cached(cfg.backend.model_dump_json())


def preflight(cfg: SampleConfig) -> None:
    sampling_backend(cfg)


def sample_lr_batch(backend, lr_images, jobs, prompts=None):
    """Sample one batch. lr_images: uint8 [h, w, 3] arrays, one per job; jobs: (sample id, candidate, seed).
    Returns (sr uint8 [B, H, W, 3] with non-finite values zeroed, finite flag per row)."""
    import torch

    from dp2o.tario import to_tensor01, to_uint8_hwc

    out = backend.sample(to_tensor01(lr_images), [seed for _, _, seed in jobs], prompts=prompts)
    finite = torch.isfinite(out).flatten(1).all(dim=1).tolist()
    return to_uint8_hwc(torch.nan_to_num(out)), finite


#: docs of the sample table's own columns
COLUMNS = {
    "backend": Column("the generator that made the candidate (backend name)"),
    "height": Column("height of the candidate SR image", "px"),
    "width": Column("width of the candidate SR image", "px"),
}


def sample_schema() -> pa.Schema:
    return documented_schema(
        "sample",
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
        COLUMNS,
    )


def plan(cfg: SampleConfig, inputs, out, *, root, storage_options, runtime) -> StagePlan:
    up = Upstream.at(inputs["degraded"], storage_options, "degrade")
    fp = fingerprint("sample", cfg, [up.entry["fingerprint"]])
    return StagePlan(
        "sample",
        fp,
        out_url(out, root, "sample", fp),
        cfg,
        up.shards(),
        upstream={"degrade": up.entry},
        storage_options=storage_options,
    )


def run_shard(plan: StagePlan, spec: ShardSpec, tmp: Path) -> ShardOutput:
    from dp2o.tario import TarReader, encode_png, image_shard

    cfg: SampleConfig = plan.config
    up = plan.upstream_dir("degrade")
    index = read_parquet(up, f"data/{spec.name}.parquet")
    ok_ids = [
        s
        for s, st in zip(index["sample_id"].to_pylist(), index["status"].to_pylist(), strict=True)
        if st == "ok"
    ]
    # a `prompt` column in the degrade index (e.g. tags added by a captioning step) overrides the fixed prompt
    prompt_of = (
        dict(zip(index["sample_id"].to_pylist(), index["prompt"].to_pylist(), strict=True))
        if "prompt" in index.column_names
        else None
    )
    backend = sampling_backend(cfg)
    jobs = candidate_seeds(cfg.seed, ok_ids, cfg.num_candidates)
    rows: list[dict] = []
    members: list[tuple[str, bytes]] = []
    with TarReader(local_copy(up, f"data/{spec.name}.tar", tmp)) as tar:
        lrs = {sid: tar.image(f"{sid}.lr.png") for sid in ok_ids}  # a shard's LR inputs are small
    bs, n = cfg.batch_size, len(jobs)
    for i in within(f"sample {spec.name}", n, "candidates").over(range(0, n, bs), lambda i: min(bs, n - i)):
        stopping.check()
        chunk = jobs[i : i + cfg.batch_size]
        prompts = [prompt_of[sid] or cfg.backend.prompt for sid, _, _ in chunk] if prompt_of else None
        sr, finite = sample_lr_batch(backend, [lrs[sid] for sid, _, _ in chunk], chunk, prompts)
        for j, (sid, c, seed) in enumerate(chunk):
            row = {
                "sample_id": sid,
                "candidate": c,
                "seed": seed,
                "backend": backend.name,
                "height": int(sr.shape[1]),
                "width": int(sr.shape[2]),
                "status": "ok",
                "error": None,
            }
            if finite[j]:
                members.append((f"{candidate_key(sid, c)}.sr.png", encode_png(sr[j])))
            else:  # e.g. fp16 overflow: record it, keep the other candidates
                row.update(status="error", error="model output has NaN/inf values")
            rows.append(row)
    shard = image_shard(spec.name, tmp, pa.Table.from_pylist(rows, schema=sample_schema()), members)
    shard.stats = {"inputs": len(ok_ids)}
    return shard


STAGE = Stage(
    name="sample",
    version=1,
    config=SampleConfig,
    section="sample",
    inputs=(Input("degraded", "degrade", "--input", "finished degrade stage folder"),),
    planner=plan,
    description="M candidates per LR input of a degrade stage",
    run_shard=run_shard,
    concurrent=False,
    resources="gpu",
    preflight=preflight,
    flags=(Flag("--num-candidates", "num_candidates", "M, candidates per LR input", int),),
)
