"""The seam between the library and any orchestrator: plan a stage, run one shard, finalise.

Every stage follows the same three steps, and an orchestrator (Prefect in `flows/`, or the plain loop in
`dp2o.runner`) only strings them together:

    plan = plan_<stage>(config, ...)          # cheap: resolves inputs, fingerprint, shard list; validates
    pending = pending_shards(plan)            # shards without a valid marker
    prepare(plan, pending)                    # writes config.json, fails fast on missing weights etc.
    for spec in pending:
        run_shard(plan, spec)                 # pure function of (plan, spec); commits files, marker last
    finalize(plan)                            # checks every marker, writes _MANIFEST.json

Shards of downstream stages correspond 1:1 to degrade shards, so a sample's candidates, scores and rewards
always live in the shard with the same name. Stages that need the whole dataset at once (reward
normalisation, pair construction, training) run as one task (`plan.single_task`).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass, field
from hashlib import sha1
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dp2o import io as dio
from dp2o import schemas
from dp2o.config import (
    DegradeConfig,
    PairsConfig,
    PipelineConfig,
    SampleConfig,
    ScoreConfig,
    TrainConfig,
    canonical,
    fingerprint,
)
from dp2o.data import BUNDLED_SCHEME, is_bundled
from dp2o.devices import resolve_device
from dp2o.io import ShardOutput, Storage, commit_shard, read_marker, shard_name
from dp2o.seeding import derive_seed
from dp2o.tario import TarReader, encode_png, to_tensor01, to_uint8_hwc, write_tar

log = logging.getLogger("dp2o")


class StageError(RuntimeError):
    """A stage cannot run or finish (bad inputs, too many failures, missing upstream); the message says why."""


@dataclass(frozen=True)
class ShardSpec:
    index: int
    name: str
    #: stage-specific inputs: source refs for degrade, nothing for 1:1 stages (the name is the key)
    inputs: tuple = ()


@dataclass
class StagePlan:
    """Everything needed to run a stage, serialisable so an orchestrator can ship it to workers."""

    stage: str
    fingerprint: str
    out_url: str
    config: Any
    shards: list[ShardSpec]
    upstream: dict[str, dict[str, Any]] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)
    single_task: bool = False

    @property
    def out(self) -> Storage:
        return Storage(self.out_url, self.storage_options)

    def upstream_dir(self, stage: str) -> Storage:
        try:
            return Storage(self.upstream[stage]["url"], self.storage_options)
        except KeyError:
            raise StageError(f"{self.stage}: no upstream {stage!r} recorded in the plan") from None


# ---- locating stage folders --------------------------------------------------------------------------------


def stage_url(root: str, stage: str, fp: str) -> str:
    return f"{root.rstrip('/')}/{stage}/{fp}"


def resolve_stage_dir(url: str, storage_options: dict | None = None, stage: str | None = None) -> Storage:
    """A finished stage folder from a URL that is either the folder itself (holds _MANIFEST.json) or its parent
    `<root>/<stage>` holding exactly one finished fingerprint folder."""
    s = Storage(url, storage_options)
    if s.exists(dio.MANIFEST):
        return s
    done = [name for name in s.listdir() if s.exists(name, dio.MANIFEST)]
    if len(done) == 1:
        return s.child(done[0])
    what = f"{stage} " if stage else ""
    if not done:
        raise StageError(
            f"{url} is not a finished {what}stage folder (no {dio.MANIFEST}); run the {what}stage first, "
            "or pass the folder that holds _MANIFEST.json"
        )
    raise StageError(f"{url} holds several finished runs {done}; pass one of them explicitly")


def read_manifest(stage_dir: Storage) -> dict:
    return stage_dir.read_json(dio.MANIFEST)


@dataclass(frozen=True)
class _Upstream:
    """A finished upstream stage folder, its manifest read once (one GET on object stores)."""

    dir: Storage
    manifest: dict

    @classmethod
    def at(cls, url: str, storage_options: dict, stage: str) -> _Upstream:
        found = resolve_stage_dir(url, storage_options, stage)
        return cls(found, read_manifest(found))

    @property
    def entry(self) -> dict:
        """What a downstream manifest records about this folder under `upstream`."""
        m = self.manifest
        return {"url": self.dir.url, "fingerprint": m["fingerprint"], "stage": m["stage"]}

    @property
    def lineage(self) -> dict:
        """This folder's own `upstream` record: the stages before it."""
        return self.manifest["upstream"]

    def shards(self) -> list[ShardSpec]:
        """Shards named like this folder's (a stage that maps shard to shard)."""
        return [ShardSpec(i, s["name"]) for i, s in enumerate(self.manifest["shards"])]


def _out(out_url: str | None, root: str | None, stage: str, fp: str) -> str:
    return out_url or stage_url(root or "runs", stage, fp)


# ---- planning ------------------------------------------------------------------------------------------------


def _listing_hash(keys) -> str:
    """Fingerprint of an input that is a list of files rather than a stage folder: a hash of one key per file."""
    return sha1("\n".join(keys).encode()).hexdigest()


def _source_listing(input_url: str, sources) -> str:
    """Hash naming the HR sources. Bundled photos are keyed by their `bundled://` name, not by where the installed
    packages keep them, so a second clone or a recreated virtual environment reuses the same outputs."""
    if is_bundled(input_url):
        return _listing_hash(f"{BUNDLED_SCHEME}{s.relpath}" for s in sources)
    return _listing_hash(f"{s.uri}|{s.member or ''}" for s in sources)


def plan_degrade(
    cfg: DegradeConfig,
    out_url: str | None = None,
    *,
    root: str | None = None,
    storage_options: dict | None = None,
) -> StagePlan:
    from dp2o.degrade.ingest import list_sources

    so = dict(storage_options or {})
    sources = list_sources(cfg.input, storage_options=so)
    if not sources:
        raise StageError(f"degrade.input={cfg.input!r}: no image files found there")
    listing = _source_listing(cfg.input, sources)
    fp = fingerprint("degrade", cfg, [listing])
    refs = [(s.uri, s.relpath, s.member) for s in sources]
    n = cfg.images_per_shard
    shards = [
        ShardSpec(i, shard_name(i), tuple(refs[j : j + n])) for i, j in enumerate(range(0, len(refs), n))
    ]
    return StagePlan(
        "degrade",
        fp,
        _out(out_url, root, "degrade", fp),
        cfg,
        shards,
        upstream={"source": {"url": cfg.input, "fingerprint": listing, "files": len(refs)}},
        storage_options=so,
    )


def plan_sample(
    cfg: SampleConfig,
    degraded_url: str,
    out_url: str | None = None,
    *,
    root: str | None = None,
    storage_options: dict | None = None,
) -> StagePlan:
    so = dict(storage_options or {})
    up = _Upstream.at(degraded_url, so, "degrade")
    fp = fingerprint("sample", cfg, [up.entry["fingerprint"]])
    return StagePlan(
        "sample",
        fp,
        _out(out_url, root, "sample", fp),
        cfg,
        up.shards(),
        upstream={"degrade": up.entry},
        storage_options=so,
    )


def plan_score(
    cfg: ScoreConfig,
    samples_url: str,
    out_url: str | None = None,
    *,
    root: str | None = None,
    storage_options: dict | None = None,
) -> StagePlan:
    so = dict(storage_options or {})
    up = _Upstream.at(samples_url, so, "sample")
    fp = fingerprint("score", _score_part(cfg), [up.entry["fingerprint"]])
    return StagePlan(
        "score",
        fp,
        _out(out_url, root, "score", fp),
        cfg,
        up.shards(),
        upstream={"sample": up.entry, "degrade": up.lineage["degrade"]},
        storage_options=so,
    )


def _score_part(cfg: ScoreConfig) -> dict:
    """The part of ScoreConfig that changes raw metric values (the reward settings do not)."""
    c = canonical(cfg)
    c.pop("reward", None)
    return c


def plan_reward(
    cfg: ScoreConfig,
    scores_url: str,
    out_url: str | None = None,
    *,
    root: str | None = None,
    storage_options: dict | None = None,
) -> StagePlan:
    so = dict(storage_options or {})
    up = _Upstream.at(scores_url, so, "score")
    fp = fingerprint(
        "reward",
        {"metrics": canonical(cfg.metrics), "reward": canonical(cfg.reward)},
        [up.entry["fingerprint"]],
    )
    return StagePlan(
        "reward",
        fp,
        _out(out_url, root, "reward", fp),
        cfg,
        up.shards(),
        upstream={"score": up.entry, **up.lineage},
        storage_options=so,
        single_task=True,
    )


def plan_pairs(
    cfg: PairsConfig,
    rewards_url: str,
    out_url: str | None = None,
    *,
    root: str | None = None,
    storage_options: dict | None = None,
) -> StagePlan:
    """Pairs from a finished reward stage folder, or from any Parquet file/folder with sample_id, candidate,
    reward (then `upstream` records the URL and a hash of the file list)."""
    so = dict(storage_options or {})
    try:
        up = _Upstream.at(rewards_url, so, "reward")
        entry = up.entry
        upstream = {"reward": entry, **up.lineage}
    except StageError:
        files = _parquet_files(rewards_url, so)
        listing = _listing_hash(f"{p}|{n}" for p, n in files)
        entry = {"url": rewards_url, "fingerprint": listing, "stage": "external"}
        upstream = {"reward": entry}
    fp = fingerprint("pairs", cfg, [entry["fingerprint"]])
    return StagePlan(
        "pairs",
        fp,
        _out(out_url, root, "pairs", fp),
        cfg,
        [ShardSpec(0, shard_name(0))],
        upstream=upstream,
        storage_options=so,
        single_task=True,
    )


def plan_train(
    cfg: TrainConfig,
    pairs_url: str,
    out_url: str | None = None,
    *,
    root: str | None = None,
    samples_url: str | None = None,
    storage_options: dict | None = None,
) -> StagePlan:
    so = dict(storage_options or {})
    up = _Upstream.at(pairs_url, so, "pairs")
    upstream = {"pairs": up.entry, **up.lineage}
    if samples_url is not None:
        samples = _Upstream.at(samples_url, so, "sample")
        upstream["sample"] = samples.entry
        upstream["degrade"] = samples.lineage["degrade"]
    if "sample" not in upstream:
        raise StageError(
            f"train: cannot find the sampled candidates for pairs at {pairs_url}; pass --samples"
        )
    fp = fingerprint("train", cfg, [up.entry["fingerprint"], upstream["sample"]["fingerprint"]])
    return StagePlan(
        "train",
        fp,
        _out(out_url, root, "train", fp),
        cfg,
        [ShardSpec(0, "train")],
        upstream=upstream,
        storage_options=so,
        single_task=True,
    )


def _parquet_files(url: str, so: dict) -> list[tuple[str, int]]:
    s = Storage(url, so)
    if s.fs.isfile(s.path):
        return [(s.path, s.fs.size(s.path))]
    found = sorted(p for p in s.fs.find(s.path) if p.endswith(".parquet") and "/." not in p and "/_" not in p)
    if not found:
        raise StageError(f"{url}: no Parquet files (and no _MANIFEST.json) found")
    return [(p, s.fs.size(p)) for p in found]


# ---- prepare / pending / finalize ----------------------------------------------------------------------------


def prepare(plan: StagePlan, pending: list[ShardSpec]) -> None:
    """Write config.json (refusing a folder that holds another config's results) and fail fast on things that
    would only break later (missing metric weights) when there is work left to do."""
    out = plan.out
    resolved = {
        "stage": plan.stage,
        "fingerprint": plan.fingerprint,
        "config": canonical(plan.config),
        "upstream": plan.upstream,
    }
    if out.exists("config.json"):
        old = out.read_json("config.json")
        if old.get("fingerprint") != plan.fingerprint:
            raise StageError(
                f"{plan.out_url} already holds {old.get('stage')} results of another config "
                f"(fingerprint {old.get('fingerprint')}, now {plan.fingerprint}); choose another output folder"
            )
    else:
        out.write_json_atomic(resolved, "config.json")
    if plan.stage == "score" and pending:
        _scorer(plan.config)  # loads every metric now: missing weights fail before any image is read


def preflight(cfg: PipelineConfig) -> None:
    """Load the sampling backend and the IQA metrics before the first stage runs, so a missing weight folder,
    a wrong model class or absent metric weights fail in seconds, not after hours of degradation. Both are
    cached per process, so the stages reuse them."""
    sampling_backend(cfg.sample)
    _scorer(cfg.score)


def pending_shards(plan: StagePlan) -> list[ShardSpec]:
    out = plan.out
    return [s for s in plan.shards if read_marker(out, s.name, fingerprint=plan.fingerprint) is None]


def finalize(plan: StagePlan) -> dict:
    """Write _MANIFEST.json once every shard has a valid marker; enforce max_failed_fraction."""
    out = plan.out
    markers = []
    for s in plan.shards:
        m = read_marker(out, s.name, fingerprint=plan.fingerprint)
        if m is None:
            raise StageError(
                f"{plan.stage}: shard {s.name} in {plan.out_url} is not committed; rerun the stage"
            )
        markers.append(m)
    rows = sum(m["rows"] for m in markers)
    errors = sum(m["errors"] for m in markers)
    limit = getattr(plan.config, "max_failed_fraction", None)
    if limit is not None and rows and errors / rows > limit:
        raise StageError(
            f"{plan.stage}: {errors} of {rows} rows failed ({errors / rows:.0%}) > max_failed_fraction={limit}; "
            f"see the `error` column of {plan.out_url}/data/*.parquet"
        )
    stats: dict[str, Any] = {}
    for m in markers:
        for k, v in m.get("stats", {}).items():
            stats[k] = _combine(k, stats.get(k), v)
    manifest = {
        "stage": plan.stage,
        "fingerprint": plan.fingerprint,
        "config": canonical(plan.config),
        "upstream": plan.upstream,
        "shards": [
            {"name": m["shard"], "files": m["files"], "rows": m["rows"], "errors": m["errors"]}
            for m in markers
        ],
        "rows": rows,
        "errors": errors,
        "stats": stats,
        "created": dio.now_iso(),
    }
    out.write_json_atomic(manifest, dio.MANIFEST)
    if out.local:
        out.rm(".tmp", recursive=True)
    return manifest


def _combine(key: str, old: Any, new: Any) -> Any:
    """Merge one per-shard statistic into the stage total: min/max for *_min/*_max, sums for other numbers."""
    if old is None:
        return new
    if new is None:
        return old
    if key.endswith("_min"):
        return min(old, new)
    if key.endswith("_max"):
        return max(old, new)
    if isinstance(new, int | float) and not isinstance(new, bool):
        return old + new
    return new


def run_shard(plan: StagePlan, spec: ShardSpec) -> dict:
    """Compute and commit one shard; returns its marker."""
    fn = {"degrade": _run_degrade, "sample": _run_sample, "score": _run_score}[plan.stage]
    t0 = time.perf_counter()
    out = plan.out
    with out.local_tmpdir() as tmp:
        result = fn(plan, spec, Path(tmp))
        return commit_shard(out, result, fingerprint=plan.fingerprint, seconds=time.perf_counter() - t0)


def run_single(plan: StagePlan, specs: list[ShardSpec] | None = None) -> list[dict]:
    """Run a whole-dataset stage (reward, pairs, train) over its pending shards in one call."""
    specs = pending_shards(plan) if specs is None else specs
    if not specs:
        return []
    fn = {"reward": _run_reward, "pairs": _run_pairs, "train": _run_train}[plan.stage]
    return fn(plan, specs)


# ---- degrade -----------------------------------------------------------------------------------------------------

_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def source_sample_id(relpath: str) -> str:
    """Readable, unique, dot-free id for a source file: sanitised stem + 8 hex digits of its path's hash."""
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    readable = _SAFE.sub("_", stem).strip("_")[-40:] or "img"
    return f"{readable}-{sha1(relpath.encode()).hexdigest()[:8]}"


def _run_degrade(plan: StagePlan, spec: ShardSpec, tmp: Path) -> ShardOutput:
    from dp2o.degrade.ingest import ImageRejected, SourceRef, crop_origin, load_hr
    from dp2o.degrade.params import sample_params
    from dp2o.degrade.pipeline import degrade_batch

    cfg: DegradeConfig = plan.config
    scale = cfg.degradation.scale
    rows: list[dict] = []
    jobs: list[tuple[str, np.ndarray, Any]] = []  # (sample_id, hr crop uint8 HWC, params)
    for uri, relpath, member in spec.inputs:
        base = source_sample_id(relpath)
        ref = SourceRef(uri=uri, relpath=relpath, member=member)
        try:
            img = load_hr(ref, min_size=cfg.min_size or cfg.crop_size, storage_options=plan.storage_options)
            if min(img.shape[:2]) < cfg.crop_size:
                raise ImageRejected(
                    f"{relpath}: {img.shape[1]}x{img.shape[0]} is smaller than crop_size={cfg.crop_size}"
                )
        except ImageRejected as e:
            rows.append(schemas.degrade_error_row(f"{base}-c00", relpath, scale, str(e)))
            continue
        h, w = img.shape[:2]
        for k in range(cfg.crops_per_image):
            sid = f"{base}-c{k:02d}"
            seed = derive_seed(cfg.seed, "degrade", sid)
            y, x = crop_origin(h, w, cfg.crop_size, seed)
            crop = img[y : y + cfg.crop_size, x : x + cfg.crop_size]
            params = sample_params(cfg.degradation, seed)
            jobs.append((sid, crop, params))
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
    for i in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[i : i + cfg.batch_size]
        hr = torch.from_numpy(np.stack([c for _, c, _ in chunk])).permute(0, 3, 1, 2).contiguous()
        hr_t, lr = degrade_batch(hr, [p for _, _, p in chunk], cfg.degradation, device=cfg.device)
        hr_np = hr_t.permute(0, 2, 3, 1).numpy()
        lr_np = lr.permute(0, 2, 3, 1).numpy()
        for j, (sid, _, _) in enumerate(chunk):
            members.append((f"{sid}.hr.png", encode_png(hr_np[j])))
            members.append((f"{sid}.lr.png", encode_png(lr_np[j])))
    shard = _image_shard(spec, tmp, pa.Table.from_pylist(rows, schema=schemas.degrade_schema()), members)
    shard.stats = {"samples_ok": shard.rows - shard.errors, "sources": len(spec.inputs), "device": cfg.device}
    return shard


def _image_shard(
    spec: ShardSpec, tmp: Path, table: pa.Table, members: list[tuple[str, bytes]]
) -> ShardOutput:
    """Write an image stage's shard locally: the Parquet index and the tar of PNGs, ready to commit."""
    pq_path, tar_path = tmp / f"{spec.name}.parquet", tmp / f"{spec.name}.tar"
    dio.write_parquet(table, pq_path)
    write_tar(tar_path, members)
    errors = sum(s != "ok" for s in table["status"].to_pylist())
    return ShardOutput(
        spec.name,
        {f"data/{spec.name}.parquet": str(pq_path), f"data/{spec.name}.tar": str(tar_path)},
        rows=table.num_rows,
        errors=errors,
    )


# ---- sample ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _backend_cached(cfg_json: str):
    from dp2o.models import BackendConfig, build_backend

    return build_backend(BackendConfig.model_validate_json(cfg_json))


def sampling_backend(cfg: SampleConfig):
    """The backend for sampling, loaded once per process (weights are read-only while sampling)."""
    return _backend_cached(cfg.backend.model_dump_json())


def _local_copy(stage_dir: Storage, rel: str, tmp: Path) -> Path:
    if stage_dir.local:
        return Path(stage_dir.p(rel))
    # name the copy after its stage folder too: score reads two stages' tars with the same shard name
    dest = tmp / f"{sha1(stage_dir.url.encode()).hexdigest()[:12]}-{rel.replace('/', '__')}"
    return stage_dir.download(rel, to=dest)


def candidate_key(sample_id: str, candidate: int) -> str:
    return f"{sample_id}_{candidate:03d}"


def _run_sample(plan: StagePlan, spec: ShardSpec, tmp: Path) -> ShardOutput:
    cfg: SampleConfig = plan.config
    up = plan.upstream_dir("degrade")
    index = dio.read_parquet(up, f"data/{spec.name}.parquet")
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
    jobs = [
        (sid, c, derive_seed(cfg.seed, "sample", sid, c)) for sid in ok_ids for c in range(cfg.num_candidates)
    ]
    rows: list[dict] = []
    members: list[tuple[str, bytes]] = []
    with TarReader(_local_copy(up, f"data/{spec.name}.tar", tmp)) as tar:
        lrs = {sid: tar.image(f"{sid}.lr.png") for sid in ok_ids}  # a shard's LR inputs are small
    for i in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[i : i + cfg.batch_size]
        lr = to_tensor01(lrs[sid] for sid, _, _ in chunk)
        prompts = [prompt_of[sid] or cfg.backend.prompt for sid, _, _ in chunk] if prompt_of else None
        out = backend.sample(lr, [seed for _, _, seed in chunk], prompts=prompts)
        finite = torch.isfinite(out).flatten(1).all(dim=1).tolist()
        sr = to_uint8_hwc(torch.nan_to_num(out))
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
    shard = _image_shard(spec, tmp, pa.Table.from_pylist(rows, schema=schemas.sample_schema()), members)
    shard.stats = {"inputs": len(ok_ids)}
    return shard


# ---- score -------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _scorer_cached(metrics_json: str, device: str, batch_size: int):
    import json

    from dp2o.reward.registry import resolve_metrics
    from dp2o.reward.scoring import MetricScorer

    metrics = json.loads(metrics_json)
    return MetricScorer(resolve_metrics(metrics), device=device, batch_size=batch_size)


def _scorer(cfg: ScoreConfig):
    import json

    metrics = cfg.metrics if isinstance(cfg.metrics, str) else list(cfg.metrics)
    return _scorer_cached(json.dumps(metrics), str(resolve_device(cfg.device)), cfg.batch_size)


def metric_specs(cfg: ScoreConfig):
    from dp2o.reward.registry import resolve_metrics

    return resolve_metrics(cfg.metrics if isinstance(cfg.metrics, str) else list(cfg.metrics))


def _run_score(plan: StagePlan, spec: ShardSpec, tmp: Path) -> ShardOutput:
    cfg: ScoreConfig = plan.config
    specs = metric_specs(cfg)
    scorer = _scorer(cfg)
    sample_dir, degrade_dir = plan.upstream_dir("sample"), plan.upstream_dir("degrade")
    cands = dio.read_parquet(sample_dir, f"data/{spec.name}.parquet").to_pylist()
    rows: list[dict] = []
    with (
        TarReader(_local_copy(sample_dir, f"data/{spec.name}.tar", tmp)) as sr_tar,
        TarReader(_local_copy(degrade_dir, f"data/{spec.name}.tar", tmp)) as hr_tar,
    ):
        by_sample: dict[str, list[dict]] = {}
        for r in cands:
            if r["status"] == "ok":
                by_sample.setdefault(r["sample_id"], []).append(r)
        for sid, group in by_sample.items():
            hr = to_tensor01([hr_tar.image(f"{sid}.hr.png")])
            sr = to_tensor01(sr_tar.image(f"{candidate_key(sid, r['candidate'])}.sr.png") for r in group)
            scores = scorer.score(sr, hr.expand(len(group), -1, -1, -1))
            for j, r in enumerate(group):
                rows.append(
                    {
                        "sample_id": sid,
                        "candidate": r["candidate"],
                        "seed": r["seed"],
                        "status": "ok",
                        "error": None,
                        **{m.name: float(scores[m.name][j]) for m in specs},
                    }
                )
    table = pa.Table.from_pylist(rows, schema=schemas.score_schema([m.name for m in specs]))
    pq_path = tmp / f"{spec.name}.parquet"
    dio.write_parquet(table, pq_path)
    return ShardOutput(spec.name, {f"data/{spec.name}.parquet": str(pq_path)}, rows=len(rows), errors=0)


# ---- reward --------------------------------------------------------------------------------------------------------


def _run_reward(plan: StagePlan, specs_todo: list[ShardSpec]) -> list[dict]:
    from dp2o.reward.hybrid import compute_reward

    cfg: ScoreConfig = plan.config
    specs = metric_specs(cfg)
    score_dir = plan.upstream_dir("score")
    tables = []
    for s in plan.shards:
        t = dio.read_parquet(score_dir, f"data/{s.name}.parquet")
        tables.append(t.append_column("_shard", pa.array([s.index] * t.num_rows, pa.int32())))
    full = pa.concat_tables(tables)
    full = full.filter(pc.equal(full["status"], "ok"))
    reward, bounds = compute_reward(full, specs, cfg.reward)
    full = full.append_column("reward", pa.array(np.asarray(reward, dtype=np.float64)))
    out = plan.out
    out.write_json_atomic({"bounds": bounds, "reward": canonical(cfg.reward)}, "normalization.json")
    markers = []
    todo = {s.name for s in specs_todo}
    for s in plan.shards:
        if s.name not in todo:
            continue
        t0 = time.perf_counter()
        part = full.filter(pc.equal(full["_shard"], s.index)).drop_columns(["_shard"])
        with out.local_tmpdir() as tmp:
            p = Path(tmp) / f"{s.name}.parquet"
            dio.write_parquet(part, p)
            r = part["reward"].to_numpy()
            stats = {
                "reward_sum": float(r.sum()),
                "reward_min": float(r.min()) if len(r) else None,
                "reward_max": float(r.max()) if len(r) else None,
            }
            markers.append(
                commit_shard(
                    out,
                    ShardOutput(s.name, {f"data/{s.name}.parquet": str(p)}, rows=part.num_rows, stats=stats),
                    fingerprint=plan.fingerprint,
                    seconds=time.perf_counter() - t0,
                )
            )
    return markers


def read_stage_table(stage_dir: Storage, columns: list[str] | None = None) -> pa.Table:
    """Concatenate the Parquet files a finished stage's manifest lists (never a glob of the folder)."""
    m = read_manifest(stage_dir)
    parts = [
        dio.read_parquet(stage_dir, rel, columns)
        for s in m["shards"]
        for rel in s["files"]
        if rel.endswith(".parquet")
    ]
    return pa.concat_tables(parts) if parts else pa.table({})


# ---- pairs -----------------------------------------------------------------------------------------------------------


def load_scores_table(url: str, storage_options: dict) -> pa.Table:
    """sample_id, candidate, reward from a reward stage folder or any Parquet file/folder."""
    cols = ["sample_id", "candidate", "reward"]
    try:
        return read_stage_table(resolve_stage_dir(url, storage_options, "reward"), cols)
    except StageError:
        pass
    import pyarrow.parquet as pq

    s = Storage(url, storage_options)
    parts = []
    for path, _ in _parquet_files(url, storage_options):
        with s.fs.open(path, "rb") as f:
            t = pq.read_table(f)
        missing = [c for c in cols if c not in t.column_names]
        if missing:
            raise StageError(f"{path}: missing column(s) {missing}; pairs needs {cols}")
        parts.append(t.select(cols))
    return pa.concat_tables(parts)


def _run_pairs(plan: StagePlan, specs_todo: list[ShardSpec]) -> list[dict]:
    from dp2o.pairs.build import build_pairs

    cfg: PairsConfig = plan.config
    t0 = time.perf_counter()
    scores = load_scores_table(plan.upstream["reward"]["url"], plan.storage_options)
    scores = scores.filter(pc.is_valid(scores["reward"]))
    table, stats = build_pairs(
        scores["sample_id"],  # Arrow column: 10M strings as a NumPy object array would cost seconds
        scores["candidate"].to_numpy(),
        scores["reward"].to_numpy(),
        n_top=cfg.n_top,
        weighting=cfg.weighting,
    )
    out = plan.out
    name = specs_todo[0].name
    with out.local_tmpdir() as tmp:
        p = Path(tmp) / f"{name}.parquet"
        dio.write_parquet(table, p)
        st = {k: _json_number(v) for k, v in stats.to_dict().items()}
        return [
            commit_shard(
                out,
                ShardOutput(name, {f"data/{name}.parquet": str(p)}, rows=table.num_rows, stats=st),
                fingerprint=plan.fingerprint,
                seconds=time.perf_counter() - t0,
            )
        ]


def _json_number(v: Any) -> Any:
    """NumPy scalars as Python numbers; NaN (e.g. mu_sigma when no group yields pairs) as null."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


# ---- train -------------------------------------------------------------------------------------------------------------


def _run_train(plan: StagePlan, specs_todo: list[ShardSpec]) -> list[dict]:
    from dp2o.models import BackendConfig, build_backend
    from dp2o.train.data import PairImages
    from dp2o.train.loop import train_dpo

    cfg: TrainConfig = plan.config
    t0 = time.perf_counter()
    sample_dir = plan.upstream_dir("sample")
    sample_cfg = read_manifest(sample_dir)["config"]
    backend = build_backend(BackendConfig.model_validate(sample_cfg["backend"]))
    pairs = read_stage_table(plan.upstream_dir("pairs"))
    out = plan.out
    with out.local_tmpdir() as tmp:
        images = PairImages(sample_dir, plan.upstream_dir("degrade"), cache_dir=Path(tmp) / "cache")
        try:
            result = train_dpo(backend, pairs, images, cfg, out)
        finally:
            images.close()
        files = {}
        mdir = Path(tmp) / "model"
        backend.save_trainable(mdir)
        for f in sorted(mdir.rglob("*")):
            if f.is_file():
                files[f"model/{f.relative_to(mdir).as_posix()}"] = str(f)
        mp = Path(tmp) / "metrics.parquet"
        dio.write_parquet(result.metrics, mp)
        files["data/metrics.parquet"] = str(mp)
        return [
            commit_shard(
                out,
                ShardOutput("train", files, rows=result.metrics.num_rows, stats=result.stats),
                fingerprint=plan.fingerprint,
                seconds=time.perf_counter() - t0,
            )
        ]
