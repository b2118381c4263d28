"""`dp2o plan`: what a run costs before it runs — shards, items, GPU/CPU-hours, money, storage, Prefect load.

For every pipeline stage of the registry (`registry.pipeline_stages()`) the plan gives the number of shards,
the items the stage works on (HR photos, LR inputs, candidates, scored candidates, pairs, training pair
passes), the GPU-hours (CPU core-hours for CPU stages) and their price, the bytes it writes, the Prefect task
runs it creates, and the largest parameter an orchestrator ships for it.

Every number is computed from *figures*, and every figure names where it comes from:
  - a measurement: a file and a key, e.g. `benchmarks/results/gpu/sample_gpu.json sd2.ours.s_per_candidate`
    (written by the benchmarks), or `dp2o/estimate.py RECORDED['...']` (small measurements recorded below,
    each with how it was taken; docs/scale.md says how); measured speeds are scaled to the config's
    steps and pixels when they differ from the benchmark's, and the source says so;
  - an assumption: "assumption: <why> (override with --set-cost KEY=VALUE)";
  - a value the user gave: `--set-cost KEY=VALUE`, `--price-per-gpu-hour`.

The design choice a reader would miss: the *cost models* are stage-specific by nature (a sample costs seconds
per candidate, pairs cost per pair), so they live in one dict keyed by stage name (`COST_MODELS`) — data
about the stages, like the metric registry — while everything generic (task-run counts, parameter sizes,
hours, prices, totals) is derived from the registry's declarations (`resources`, `whole_dataset`). A stage
registered without a cost model still gets its row, marked unmodelled. The parameter-size column pickles and
JSON-encodes real `StagePlan`/`ShardSpec` objects built from the config's own sections, because that is what
crosses the orchestrator: every shard task receives the whole plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha1
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dp2o import registry
from dp2o.config import ConfigError, PipelineConfig, load_config, parse_overrides
from dp2o.plan import ShardSpec, StagePlan
from dp2o.storage import shard_name

REPO = Path(__file__).resolve().parent.parent

#: Prefect stores every flow and task parameter in its database; Prefect Cloud caps one parameter at 512 KB
#: (DESIGN.md, "Scale"). Checked as 512 KiB.
PREFECT_PARAM_LIMIT = 512 * 1024


@dataclass(frozen=True)
class GpuKind:
    """A GPU relative to the measured H100 (benchmarks/results/gpu/device.txt: H100 80GB HBM3)."""

    speed: float
    price_per_hour: float
    why: str


#: throughput on bf16 diffusion relative to the measured H100, and a typical on-demand price: assumptions
GPU_KINDS: dict[str, GpuKind] = {
    "h100": GpuKind(1.0, 2.50, "the benchmarked GPU (H100 80GB HBM3)"),
    "h200": GpuKind(1.1, 3.50, "H100's tensor cores with more memory bandwidth: about 10% faster"),
    "a100": GpuKind(0.5, 1.50, "312 vs 989 dense bf16 TFLOP/s; about half an H100 on diffusion in practice"),
    "l40s": GpuKind(0.45, 1.00, "362 dense bf16 TFLOP/s on GDDR6: a little under half an H100"),
}
CPU_PRICE_PER_CORE_HOUR = 0.05

#: Measurements too small for a benchmark file: key -> (value, how it was measured). Taken once on a 2-core
#: x86_64 development machine, one thread; docs/scale.md, "How the recorded figures were measured".
RECORDED: dict[str, tuple[float, str]] = {
    "hr_png_bytes_per_px": (
        1.6954,
        "mean HR PNG of the degrade stage at crop 512 on bundled://all (20 crops of the 5 photos >= 512 px): "
        "444,436 B per 512^2 px",
    ),
    "lr_png_bytes_per_px": (1.8437, "mean LR PNG of the same run: 30,207 B per 128^2 px"),
    "png_encode_s_per_mp": (0.1653, "dp2o.tario.encode_png of 512^2 crops of the bundled photos: 43.3 ms"),
    "png_decode_s_per_mp": (0.0456, "load_hr over bundled://all, 11 photos of 0.48 MP mean: 21.8 ms each"),
    "degrade_parquet_bytes_per_row": (145.9, "degrade_schema() rows with real parameters, 64 vs 640 rows"),
    "degrade_parquet_bytes_per_file": (15318, "intercept of the same fit (the footer of ~40 columns)"),
    "sample_parquet_bytes_per_row": (10.2, "sample_schema() rows, M=32, 2,048 vs 20,480 rows"),
    "parquet_bytes_per_file": (1708, "intercept of the sample fit (the footer of a narrow table)"),
    "score_parquet_bytes_per_row": (10.2, "score_schema([]) rows (ids, seed, status), same sizes"),
    "score_parquet_bytes_per_metric": (6.07, "per metric column, float32 scores stored as float64"),
    "reward_parquet_bytes_per_row": (9.4, "the float64 reward column added to a score table"),
    "pairs_parquet_bytes_per_row": (21.6, "build_pairs() output for N=8, M=32, 6,400 vs 64,000 pairs"),
    "reward_s_per_row_metric_dataset": (
        2.95e-8,
        "compute_reward, dataset bounds, 1M rows x 9 metrics: 0.27 s",
    ),
    "reward_s_per_row_metric_group": (7.30e-7, "compute_reward, group bounds, 1M rows x 9 metrics: 6.6 s"),
}

_DEGRADE_SPEED = "benchmarks/results/degrade_speed.json"
_SAMPLE_GPU = "benchmarks/results/gpu/sample_gpu.json"
_PIPELINE_CHECK = "benchmarks/results/gpu/gpu_pipeline_check.json"
_PAIRS_10M = "benchmarks/results/pairs_10m.json"

#: the benchmark values when this module was written, used (labelled as assumptions) where the benchmark
#: files are absent, e.g. in an installed wheel, which has no benchmarks/ folder
RECORDED_BENCHMARKS: dict[tuple[str, str], float] = {
    (_DEGRADE_SPEED, "devices.cpu.ours_images_per_s"): 5.0638,
    (_SAMPLE_GPU, "sd2.ours.s_per_candidate"): 0.5981,
    (_SAMPLE_GPU, "sd2.ours_compiled.s_per_candidate"): 0.3234,
    (_SAMPLE_GPU, "sd2.steps"): 50,
    (_SAMPLE_GPU, "flux.ours.s_per_candidate"): 1.6073,
    (_SAMPLE_GPU, "flux.steps"): 25,
    (_SAMPLE_GPU, "output_px"): 512,
    (_SAMPLE_GPU, "sd2.params.controlnet"): 364228240,
    (_SAMPLE_GPU, "flux.params.controlnet"): 1442333696,
    (_PIPELINE_CHECK, "gpu_bf16_autocast_candidates_per_s"): 149.86,
    (_PIPELINE_CHECK, "steps"): 20,
    (_PIPELINE_CHECK, "hr"): 128,
    (_PAIRS_10M, "results.0.candidates"): 10_000_000,
    (_PAIRS_10M, "results.0.pairs"): 2_500_000,
    (_PAIRS_10M, "results.0.build_pairs_grouped_s"): 1.188,
    (_PAIRS_10M, "results.1.pairs"): 40_000_000,
    (_PAIRS_10M, "results.1.build_pairs_grouped_s"): 1.657,
}


@dataclass(frozen=True)
class BackendTiming:
    """Where a backend's sampling speed was measured and at which settings.

    speed_key: JSON key of seconds per candidate (or of candidates per second when `per_second`)
    passes:    denoiser passes per sampler step in the benchmark (2 = classifier-free guidance on)
    guided:    the backend runs a second, unconditional pass when guidance_scale > 1
    """

    file: str | None
    speed_key: str | None
    steps_key: str | None
    px_key: str | None
    passes: int
    guided: bool
    params_key: str | None
    default_steps: int
    per_second: bool = False
    compiled_key: str | None = None
    assumed_s_per_candidate: float | None = None
    assumed_params: float | None = None


BACKENDS: dict[str, BackendTiming] = {
    "sd2-controlnet": BackendTiming(
        _SAMPLE_GPU, "sd2.ours.s_per_candidate", "sd2.steps", "output_px", 2, True,
        "sd2.params.controlnet", 50, compiled_key="sd2.ours_compiled.s_per_candidate",
    ),
    "flux-controlnet": BackendTiming(
        _SAMPLE_GPU, "flux.ours.s_per_candidate", "flux.steps", "output_px", 1, False,
        "flux.params.controlnet", 25,
    ),
    "tiny": BackendTiming(
        _PIPELINE_CHECK, "gpu_bf16_autocast_candidates_per_s", "steps", "hr", 1, False, None, 20,
        per_second=True, assumed_params=2.0e6,
    ),
    "sd-x4-upscaler": BackendTiming(
        None, None, None, None, 2, True, None, 75, assumed_s_per_candidate=2.0, assumed_params=4.73e8,
    ),
}  # fmt: skip


# ---- figures -----------------------------------------------------------------------------------------------------


@dataclass
class Figure:
    """One number a plan uses: its key (for --set-cost), value, unit, source, and the stages that use it."""

    key: str
    value: float
    unit: str
    source: str
    stages: list[str] = field(default_factory=list)


def assumption(key: str, text: str) -> str:
    return f"assumption: {text} (override with --set-cost {key}=VALUE)"


def _walk(data: Any, dotted: str) -> Any:
    node = data
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


class Basis:
    """The figures of one plan. Each figure is recorded with its source the first time a stage uses it; an
    override (`--set-cost KEY=VALUE`) replaces the value and the source."""

    def __init__(self, overrides: dict[str, float] | None = None):
        self.overrides = dict(overrides or {})
        self.used: dict[str, Figure] = {}
        self.stage = ""
        self._files: dict[str, Any] = {}

    def _record(self, key: str, value: float, unit: str, source: str) -> float:
        if key in self.overrides:
            value, source = self.overrides[key], f"given: --set-cost {key}={self.overrides[key]:g}"
        fig = self.used.setdefault(key, Figure(key, float(value), unit, source))
        if self.stage and self.stage not in fig.stages:
            fig.stages.append(self.stage)
        return fig.value

    def _file(self, rel: str) -> Any | None:
        if rel not in self._files:
            path = REPO / rel
            self._files[rel] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        return self._files[rel]

    def read(self, rel: str, json_key: str) -> tuple[float, bool]:
        """A value of a benchmark file: (value, True), or (the value last read from it, False) without it."""
        data = self._file(rel)
        if data is None:
            return float(RECORDED_BENCHMARKS[(rel, json_key)]), False
        return float(_walk(data, json_key)), True

    def measured(
        self, key: str, unit: str, rel: str, json_key: str, *, invert: bool = False, scale=(1.0, "")
    ) -> float:
        """A figure from a benchmark file (1/value with `invert`), times a (factor, explanation) `scale`."""
        raw, present = self.read(rel, json_key)
        factor, note = scale
        value = (1.0 / raw if invert else raw) * factor
        where = f"{'1 / ' if invert else ''}{rel} {json_key}{note}"
        if not present:
            return self.assume(key, value, unit, f"{where}, as last measured (the file is not here)")
        return self._record(key, value, unit, where)

    def derived(self, key: str, value: float, unit: str, source: str) -> float:
        """A figure computed from several measured values; `source` names the file and keys."""
        return self._record(key, value, unit, source)

    def recorded(self, key: str, unit: str, name: str) -> float:
        return self._record(key, RECORDED[name][0], unit, f"dp2o/estimate.py RECORDED[{name!r}]")

    def assume(self, key: str, value: float, unit: str, text: str) -> float:
        return self._record(key, value, unit, assumption(key, text))

    def given(self, key: str, value: float, unit: str, how: str) -> float:
        return self._record(key, value, unit, f"given: {how}")


# ---- the cost models, one per stage -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """The sizes of a run, from the number of HR photos and the config."""

    photos: int
    lr_inputs: int
    candidates: int
    #: top-N x bottom-N per input: an upper bound (zero-spread groups give none)
    pairs: int
    pair_passes: int

    @classmethod
    def of(cls, cfg: PipelineConfig, photos: int) -> Counts:
        lr = photos * cfg.degrade.crops_per_image
        return cls(
            photos=photos,
            lr_inputs=lr,
            candidates=lr * cfg.sample.num_candidates,
            pairs=lr * cfg.pairs.n_top**2,
            pair_passes=cfg.train.steps * cfg.train.pairs_per_step,
        )


@dataclass
class Context:
    cfg: PipelineConfig
    counts: Counts
    basis: Basis
    #: HR source refs as degrade shard specs carry them: (uri, relpath, member)
    refs: list[tuple[str, str, str | None]]


@dataclass
class StageCost:
    """What one stage's cost model returns.

    device_s: seconds on the stage's resource: GPU-seconds on the measured H100 (divided by the chosen GPU's
              speed) for GPU stages, CPU core-seconds for CPU stages
    host_s:   CPU work inside a GPU stage's task (PNG coding): the GPU waits, a faster GPU does not shorten it
    """

    items: dict[str, int]
    items_text: str
    device_s: float
    shards: list[ShardSpec]
    storage: dict[str, float]
    host_s: float = 0.0
    upstream: dict[str, dict] | None = None


def _image_shards(ctx: Context) -> list[ShardSpec]:
    """degrade's shards, which sample, score and reward map one to one (`Upstream.shards`)."""
    n = math.ceil(ctx.counts.photos / ctx.cfg.degrade.images_per_shard)
    return [ShardSpec(i, shard_name(i)) for i in range(n)]


def _tar_bytes(b: Basis, members: int, files: int) -> float:
    per_member = b.assume(
        "tar.bytes_per_member",
        768,
        "B",
        "USTAR (dp2o/tario.py write_tar): 512-byte header + mean 256 B padding",
    )
    per_file = b.assume("tar.bytes_per_file", 6144, "B", "1 KiB end blocks + mean 5 KiB record padding")
    return members * per_member + files * per_file


def _px_scale(px: int, ref: float) -> tuple[float, str]:
    return (1.0, "") if px == ref else ((px / ref) ** 2, f" x ({px}/{ref:g})^2 px")


def degrade_cost(ctx: Context) -> StageCost:
    cfg, n, b = ctx.cfg.degrade, ctx.counts, ctx.basis
    hr_px, lr_px = cfg.crop_size**2, (cfg.crop_size // cfg.degradation.scale) ** 2
    s_crop = b.measured(
        "degrade.s_per_crop",
        "CPU-s per crop",
        _DEGRADE_SPEED,
        "devices.cpu.ours_images_per_s",
        invert=True,
        scale=_px_scale(cfg.crop_size, 512),
    )
    enc = b.recorded("png.encode_s_per_mp", "CPU-s per MP", "png_encode_s_per_mp")
    dec = b.recorded("png.decode_s_per_mp", "CPU-s per MP", "png_decode_s_per_mp")
    mp = b.assume("degrade.photo_mp", 2.8, "MP per HR photo", "HR photos of 2.8 MP on average (2K photos)")
    shards = [
        ShardSpec(i, shard_name(i), tuple(ctx.refs[j : j + cfg.images_per_shard]))
        for i, j in enumerate(range(0, len(ctx.refs), cfg.images_per_shard))
    ]
    hr_b = b.recorded("degrade.hr_png_bytes_per_px", "B per px", "hr_png_bytes_per_px")
    lr_b = b.recorded("degrade.lr_png_bytes_per_px", "B per px", "lr_png_bytes_per_px")
    row_b = b.recorded("degrade.parquet_bytes_per_row", "B", "degrade_parquet_bytes_per_row")
    file_b = b.recorded("degrade.parquet_bytes_per_file", "B", "degrade_parquet_bytes_per_file")
    return StageCost(
        items={"hr_photos": n.photos, "lr_inputs": n.lr_inputs},
        items_text=f"{n.photos:,} HR photos -> {n.lr_inputs:,} LR inputs",
        device_s=n.photos * mp * dec + n.lr_inputs * (s_crop + (hr_px + lr_px) / 1e6 * enc),
        shards=shards,
        storage={
            "png": n.lr_inputs * (hr_px * hr_b + lr_px * lr_b),
            "tar": _tar_bytes(b, 2 * n.lr_inputs, len(shards)),
            "parquet": n.lr_inputs * row_b + len(shards) * file_b,
        },
        upstream={
            "source": {"url": cfg.input, "fingerprint": sha1(b"listing").hexdigest(), "files": n.photos}
        },
    )


def sampling_speed(ctx: Context) -> tuple[float, int, int]:
    """(GPU-s per candidate on H100 at the config's settings, sampler steps, denoiser passes per step)."""
    backend, b = ctx.cfg.sample.backend, ctx.basis
    t = BACKENDS[backend.kind]
    steps = backend.num_inference_steps or t.default_steps
    guidance = backend.guidance_scale
    passes = 2 if t.guided and (guidance is None or guidance > 1) else 1
    key, unit = "sample.s_per_candidate", "GPU-s per candidate (H100)"
    if t.file is None:
        what = f"{backend.kind} at {t.default_steps} steps, 512 px: no benchmark of this backend yet"
        return b.assume(key, t.assumed_s_per_candidate, unit, what), steps, passes
    bench_steps, _ = b.read(t.file, t.steps_key)
    bench_px, _ = b.read(t.file, t.px_key)
    factor, note = _px_scale(ctx.cfg.degrade.crop_size, bench_px)
    if steps != bench_steps:
        factor, note = factor * steps / bench_steps, f"{note} x {steps}/{bench_steps:g} steps"
    if passes != t.passes:
        factor, note = factor * passes / t.passes, f"{note} x {passes}/{t.passes} passes (guidance)"
    speed_key = t.compiled_key if backend.compile and t.compiled_key else t.speed_key
    s = b.measured(key, unit, t.file, speed_key, invert=t.per_second, scale=(factor, note))
    return s, steps, passes


def sample_cost(ctx: Context) -> StageCost:
    n, b, px = ctx.counts, ctx.basis, ctx.cfg.degrade.crop_size**2
    s_cand, _, _ = sampling_speed(ctx)
    enc = b.recorded("png.encode_s_per_mp", "CPU-s per MP", "png_encode_s_per_mp")
    png_b = b.assume(
        "sample.png_bytes_per_px",
        RECORDED["hr_png_bytes_per_px"][0],
        "B per px",
        "a candidate PNG compresses like an HR crop of the same size (RECORDED['hr_png_bytes_per_px'])",
    )
    row_b = b.recorded("sample.parquet_bytes_per_row", "B", "sample_parquet_bytes_per_row")
    file_b = b.recorded("parquet.bytes_per_file", "B", "parquet_bytes_per_file")
    shards = _image_shards(ctx)
    return StageCost(
        items={"candidates": n.candidates},
        items_text=f"{n.candidates:,} candidates ({ctx.cfg.sample.num_candidates} per LR input)",
        device_s=n.candidates * s_cand,
        host_s=n.candidates * px / 1e6 * enc,
        shards=shards,
        storage={
            "png": n.candidates * px * png_b,
            "tar": _tar_bytes(b, n.candidates, len(shards)),
            "parquet": n.candidates * row_b + len(shards) * file_b,
        },
    )


def _metric_count(cfg: PipelineConfig) -> int:
    from dp2o.reward.registry import resolve_metrics

    metrics = cfg.score.metrics
    return len(resolve_metrics(metrics if isinstance(metrics, str) else list(metrics)))


def score_cost(ctx: Context) -> StageCost:
    n, b, crop = ctx.counts, ctx.basis, ctx.cfg.degrade.crop_size
    k = _metric_count(ctx.cfg)
    paper = 72 * 3600 / (30_000 * 64 * 9)
    factor, note = _px_scale(crop, 512)
    s_metric = b.assume(
        "score.s_per_candidate_metric",
        paper * factor,
        "GPU-s per candidate and metric (H100)",
        "the paper's ~72 h for its 9 IQA metrics over 30K x 64 candidates at 512 px (METHOD.md, Cost), split "
        f"evenly over the metrics and taken as H100 hours{note}",
    )
    dec = b.recorded("png.decode_s_per_mp", "CPU-s per MP", "png_decode_s_per_mp")
    row_b = b.recorded("score.parquet_bytes_per_row", "B", "score_parquet_bytes_per_row")
    metric_b = b.recorded("score.parquet_bytes_per_metric", "B per row", "score_parquet_bytes_per_metric")
    file_b = b.recorded("parquet.bytes_per_file", "B", "parquet_bytes_per_file")
    shards = _image_shards(ctx)
    return StageCost(
        items={"scored_candidates": n.candidates, "metrics": k},
        items_text=f"{n.candidates:,} scored candidates x {k} metrics",
        device_s=n.candidates * k * s_metric,
        # every candidate PNG and each input's HR PNG are decoded in the task
        host_s=(n.candidates + n.lr_inputs) * crop**2 / 1e6 * dec,
        shards=shards,
        storage={"parquet": n.candidates * (row_b + k * metric_b) + len(shards) * file_b},
    )


def reward_cost(ctx: Context) -> StageCost:
    n, b = ctx.counts, ctx.basis
    k = _metric_count(ctx.cfg)
    norm = ctx.cfg.score.reward.normalization
    s = b.recorded("reward.s_per_row_metric", "CPU-s", f"reward_s_per_row_metric_{norm}")
    row_b = b.recorded("score.parquet_bytes_per_row", "B", "score_parquet_bytes_per_row")
    metric_b = b.recorded("score.parquet_bytes_per_metric", "B per row", "score_parquet_bytes_per_metric")
    reward_b = b.recorded("reward.parquet_bytes_per_row", "B", "reward_parquet_bytes_per_row")
    file_b = b.recorded("parquet.bytes_per_file", "B", "parquet_bytes_per_file")
    shards = _image_shards(ctx)
    return StageCost(
        items={"scored_candidates": n.candidates},
        items_text=f"{n.candidates:,} scored candidates ({norm} bounds)",
        device_s=n.candidates * k * s,
        shards=shards,
        storage={"parquet": n.candidates * (row_b + k * metric_b + reward_b) + len(shards) * file_b},
    )


def pairs_cost(ctx: Context) -> StageCost:
    n, b = ctx.counts, ctx.basis
    read = [
        b.read(_PAIRS_10M, k)
        for k in (
            "results.0.candidates",
            "results.0.pairs",
            "results.0.build_pairs_grouped_s",
            "results.1.pairs",
            "results.1.build_pairs_grouped_s",
        )
    ]
    (c0, p0, t0, p1, t1), present = zip(*read, strict=True)
    fit = (
        f"{_PAIRS_10M} results.0.build_pairs_grouped_s, results.1.build_pairs_grouped_s and their pairs, "
        "candidates: t = a*candidates + b*pairs through both"
    )
    record = b.derived if all(present) else b.assume
    if not all(present):
        fit += ", as last measured (the file is not here)"
    per_pair = record("pairs.s_per_pair", (t1 - t0) / (p1 - p0), "CPU-s", fit)
    per_cand = record("pairs.s_per_candidate", (t0 - p0 * (t1 - t0) / (p1 - p0)) / c0, "CPU-s", fit)
    row_b = b.recorded("pairs.parquet_bytes_per_row", "B", "pairs_parquet_bytes_per_row")
    file_b = b.recorded("parquet.bytes_per_file", "B", "parquet_bytes_per_file")
    nt = ctx.cfg.pairs.n_top
    return StageCost(
        items={"pairs": n.pairs},
        items_text=f"{n.pairs:,} pairs ({nt}x{nt} per LR input, at most)",
        device_s=n.candidates * per_cand + n.pairs * per_pair,
        shards=[ShardSpec(0, shard_name(0))],
        storage={"parquet": n.pairs * row_b + file_b},
    )


def train_cost(ctx: Context) -> StageCost:
    cfg, n, b = ctx.cfg, ctx.counts, ctx.basis
    backend = cfg.sample.backend
    s_cand, steps, passes = sampling_speed(ctx)
    s_fwd = s_cand / (steps * passes)
    s_pair = b.assume(
        "train.s_per_pair",
        8 * s_fwd / 0.5,
        "GPU-s per pair (H100)",
        "8 denoiser forwards per pair (winner and loser: policy forward + backward ~3, reference forward 1) "
        f"at half the per-forward speed of sampling ({s_fwd:.4g} s = sample.s_per_candidate / "
        f"({steps} steps x {passes} passes))",
    )
    t = BACKENDS[backend.kind]
    lora = " (full model; lora_rank > 0 trains far fewer)" if backend.lora_rank else ""
    if t.params_key:
        params = b.measured("train.params", f"trainable parameters{lora}", t.file, t.params_key)
    else:
        params = b.assume("train.params", t.assumed_params, "trainable parameters", f"{backend.kind}{lora}")
    ckpt_b = b.assume(
        "train.checkpoint_bytes_per_param", 12, "B", "fp32 weights + AdamW's two fp32 moments (train/loop.py)"
    )
    model_b = b.assume("train.model_bytes_per_param", 4, "B", "the final model saved in fp32")
    kept = min(cfg.train.keep_last, (cfg.train.steps - 1) // cfg.train.checkpoint_every)
    epochs = n.pair_passes / n.pairs if n.pairs else math.inf
    return StageCost(
        items={
            "steps": cfg.train.steps,
            "pairs_per_step": cfg.train.pairs_per_step,
            "pair_passes": n.pair_passes,
        },
        items_text=f"{cfg.train.steps:,} steps x {cfg.train.pairs_per_step:,} pairs ({epochs:.2f} epochs)",
        device_s=n.pair_passes * s_pair,
        shards=[ShardSpec(0, "train")],
        storage={"checkpoints": kept * params * ckpt_b, "model": params * model_b},
    )


#: The cost model of each stage, keyed by stage name: stage-specific arithmetic, kept as data about stages.
COST_MODELS: dict[str, Callable[[Context], StageCost]] = {
    "degrade": degrade_cost,
    "sample": sample_cost,
    "score": score_cost,
    "reward": reward_cost,
    "pairs": pairs_cost,
    "train": train_cost,
}


# ---- what crosses the orchestrator -----------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def param_bytes(value: Any) -> tuple[int, int]:
    """(pickled size, compact JSON size) of a task's parameters."""
    text = json.dumps(value, default=_jsonable, separators=(",", ":"), ensure_ascii=False)
    return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)), len(text.encode("utf-8"))


def _representative_plan(
    stage: registry.Stage, cfg: PipelineConfig, cost: StageCost, before: list
) -> StagePlan:
    """The StagePlan the planner would build: the real config section and shard specs, placeholder hashes."""
    fp = "0" * 16
    upstream = cost.upstream
    if upstream is None:
        upstream = {
            s.name: {"url": f"{cfg.root}/{s.name}/{fp}", "fingerprint": fp, "stage": s.name} for s in before
        }
    return StagePlan(
        stage.name,
        fp,
        f"{cfg.root}/{stage.name}/{fp}",
        getattr(cfg, stage.section),
        cost.shards,
        upstream=upstream,
        storage_options=dict(cfg.storage_options),
        runtime=stage.runtime_of(cfg) if stage.runtime_of else {},
    )


def _task_params(stage: registry.Stage, plan: StagePlan) -> dict:
    """Parameter sizes of the stage's Prefect tasks (tasks/__init__.py), as `dp2o.driver.run_stage` calls them:
    run_shard_task(plan.only(spec), spec) per shard, or run_all_task(plan.slim(), specs), then
    finalize_task(plan.slim()). The pipeline's stage subflow takes no parameters (flows/pipeline.py)."""
    slim = plan.slim()
    slim_j = param_bytes({"plan": slim})[1]
    if stage.whole_dataset:
        largest = param_bytes({"plan": slim, "specs": plan.shards})
        task, total = "run_all_task(plan.slim(), specs)", largest[1]
    else:
        sizes = [param_bytes({"plan": plan.only(s), "spec": s}) for s in plan.shards]
        largest = max(sizes, key=lambda s: s[0])
        task = "run_shard_task(plan.only(spec), spec)"
        total = sum(j for _, j in sizes)
    return {
        "task": task,
        "pickle_bytes": largest[0],
        "json_bytes": largest[1],
        "under_limit": max(largest) <= PREFECT_PARAM_LIMIT,
        "total_json_bytes": total + slim_j,  # + the finalize task
    }


# ---- the plan --------------------------------------------------------------------------------------------------


def source_refs(cfg: PipelineConfig, photos: int | None) -> tuple[list[tuple[str, str, str | None]], str]:
    """The HR source refs degrade's shard specs carry, and how they were found.

    Listed for real when no count is given and the input is bundled or an existing local path; otherwise
    `photos` synthetic refs named like LSDIR's files (`<input>/0001000/0000001.png`)."""
    from dp2o.data import is_bundled
    from dp2o.degrade.ingest import list_sources

    url = cfg.degrade.input
    if photos is None:
        if not (is_bundled(url) or Path(url).exists()):
            raise ConfigError(
                f"--inputs N is required: degrade.input={url!r} is not bundled or a local path, so its photos "
                "cannot be counted here"
            )
        refs = [(s.uri, s.relpath, s.member) for s in list_sources(url, cfg.storage_options)]
        return refs, f"listed from degrade.input={url}"
    if photos < 1:
        raise ConfigError(f"--inputs must be at least 1, got {photos}")
    base = url.rstrip("/")
    refs = []
    for i in range(photos):
        rel = f"{(i // 1000 + 1) * 1000:07d}/{i + 1:07d}.png"
        refs.append((f"{base}/{rel}", rel, None))
    return refs, (
        f"--inputs {photos:,}: synthetic refs like {refs[0][0]} "
        "(assumption: LSDIR-style names; longer names make the degrade plan proportionally larger)"
    )


def estimate(
    cfg: PipelineConfig,
    photos: int | None = None,
    *,
    gpu: str = "h100",
    price_per_gpu_hour: float | None = None,
    price_per_cpu_hour: float | None = None,
    costs: dict[str, float] | None = None,
    config_name: str | None = None,
) -> dict:
    """The plan of a whole pipeline run over `photos` HR photos, as plain JSON-able data (see `format_plan`)."""
    if gpu not in GPU_KINDS:
        raise ConfigError(f"unknown GPU kind {gpu!r}; known: {', '.join(GPU_KINDS)}")
    refs, refs_note = source_refs(cfg, photos)
    counts = Counts.of(cfg, len(refs))
    basis = Basis(costs)
    kind = GPU_KINDS[gpu]
    basis.stage = "(all)"
    speed = basis.assume(f"gpu.{gpu}.speed", kind.speed, "x the measured H100", kind.why)
    if price_per_gpu_hour is None:
        gpu_price = basis.assume(f"gpu.{gpu}.price", kind.price_per_hour, "$ per GPU-hour", "on-demand cloud")
    else:
        gpu_price = basis.given(
            f"gpu.{gpu}.price", price_per_gpu_hour, "$ per GPU-hour", "--price-per-gpu-hour"
        )
    if price_per_cpu_hour is None:
        cpu_price = basis.assume("cpu.price", CPU_PRICE_PER_CORE_HOUR, "$ per core-hour", "on-demand cloud")
    else:
        cpu_price = basis.given("cpu.price", price_per_cpu_hour, "$ per core-hour", "--price-per-cpu-hour")
    ctx = Context(cfg, counts, basis, refs)

    rows, before = [], []
    for stage in registry.pipeline_stages():
        basis.stage = stage.name
        model = COST_MODELS.get(stage.name)
        row: dict[str, Any] = {
            "stage": stage.name,
            "resources": stage.resources,
            "whole_dataset": stage.whole_dataset,
            "modelled": model is not None,
        }
        if model is None:
            rows.append(row)
            before.append(stage)
            continue
        cost = model(ctx)
        gpu_stage = stage.resources == "gpu"
        hours = (cost.device_s / (speed if gpu_stage else 1.0) + cost.host_s) / 3600
        plan = _representative_plan(stage, cfg, cost, before)
        row.update(
            shards=len(cost.shards),
            # one task per shard (one for a whole-dataset stage) + the finalize task
            task_runs=(1 if stage.whole_dataset else len(cost.shards)) + 1,
            items=cost.items,
            items_text=cost.items_text,
            hours=hours,
            hours_unit="GPU-h" if gpu_stage else "CPU-h",
            cost=hours * (gpu_price if gpu_stage else cpu_price),
            storage=cost.storage,
            storage_bytes=sum(cost.storage.values()),
            largest_param=_task_params(stage, plan),
            figures=[f.key for f in basis.used.values() if stage.name in f.stages],
        )
        rows.append(row)
        before.append(stage)

    unknown = sorted(set(basis.overrides) - set(basis.used))
    if unknown:
        hints = {k: difflib.get_close_matches(k, basis.used, n=1) for k in unknown}
        raise ConfigError(
            "--set-cost: unknown key(s) "
            + ", ".join(f"{k}" + (f" (did you mean {h[0]}?)" if h else "") for k, h in hints.items())
            + f"; keys of this plan: {', '.join(basis.used)}"
        )
    modelled = [r for r in rows if r["modelled"]]
    largest = max(
        modelled, key=lambda r: max(r["largest_param"]["pickle_bytes"], r["largest_param"]["json_bytes"])
    )
    return {
        "config": config_name,
        "counts": dataclasses.asdict(counts),
        "sources": refs_note,
        "gpu": {"kind": gpu, "speed_vs_h100": speed, "price_per_hour": gpu_price},
        "cpu_price_per_core_hour": cpu_price,
        "prefect_param_limit_bytes": PREFECT_PARAM_LIMIT,
        "stages": rows,
        "unmodelled_stages": [r["stage"] for r in rows if not r["modelled"]],
        "totals": {
            "gpu_hours": sum(r["hours"] for r in modelled if r["resources"] == "gpu"),
            "cpu_hours": sum(r["hours"] for r in modelled if r["resources"] != "gpu"),
            "cost": sum(r["cost"] for r in modelled),
            "storage_bytes": sum(r["storage_bytes"] for r in modelled),
            "task_runs": sum(r["task_runs"] for r in modelled),
            # the pipeline flow and one subflow per stage (flows/pipeline.py)
            "flow_runs": 1 + len(rows),
            "largest_param": {"stage": largest["stage"], **largest["largest_param"]},
            "param_json_bytes_total": sum(r["largest_param"]["total_json_bytes"] for r in modelled),
        },
        "figures": [dataclasses.asdict(f) for f in basis.used.values()],
    }


# ---- text output -----------------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _hours(h: float, unit: str) -> str:
    if h >= 100:
        return f"{h:,.0f} {unit}"
    if h >= 0.1:
        return f"{h:.1f} {unit}"
    return f"{h * 3600:.1f} {unit[:-1]}s"


def _money(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:,.2f}"


def _param(p: dict) -> str:
    return f"{human_bytes(max(p['pickle_bytes'], p['json_bytes']))} {'ok' if p['under_limit'] else 'OVER'}"


def format_plan(plan: dict) -> str:
    """The plan as a fixed-width table, the totals, notes, and every figure with its source."""
    n, g, t = plan["counts"], plan["gpu"], plan["totals"]
    lines = [
        f"dp2o plan: {plan['config'] or 'default config'}",
        f"  {n['photos']:,} HR photos ({plan['sources']})",
        f"  GPU {g['kind']} at {g['speed_vs_h100']:g}x the measured H100, ${g['price_per_hour']:g}/GPU-h; "
        f"CPU ${plan['cpu_price_per_core_hour']:g}/core-h",
        "",
    ]
    head = f"{'stage':<8} {'on':<3} {'shards':>6} {'tasks':>6}  {'items':<50} {'hours':>12} {'cost':>9} "
    head += f"{'storage':>9}  {'largest param':<14}"
    lines += [head, "-" * len(head)]
    for r in plan["stages"]:
        if not r["modelled"]:
            lines.append(
                f"{r['stage']:<8} {r['resources']:<3} {'?':>6} {'?':>6}  (no cost model for this stage)"
            )
            continue
        lines.append(
            f"{r['stage']:<8} {r['resources']:<3} {r['shards']:>6,} {r['task_runs']:>6,}  {r['items_text']:<50} "
            f"{_hours(r['hours'], r['hours_unit']):>12} {_money(r['cost']):>9} "
            f"{human_bytes(r['storage_bytes']):>9}  {_param(r['largest_param']):<14}"
        )
    lines.append("-" * len(head))
    hours = f"{_hours(t['gpu_hours'], 'GPU-h')} + {_hours(t['cpu_hours'], 'CPU-h')}"
    lines.append(
        f"{'total':<8} {'':<3} {'':>6} {t['task_runs']:>6,}  {hours:<50} {'':>12} {_money(t['cost']):>9} "
        f"{human_bytes(t['storage_bytes']):>9}  {_param(t['largest_param']):<14}"
    )
    lp = t["largest_param"]
    limit = f"512 KB ({plan['prefect_param_limit_bytes']:,} B)"
    verdict = "under" if lp["under_limit"] else "OVER"
    lines += [
        "",
        f"Prefect: {t['task_runs']:,} task runs (one per shard of a shard-wise stage, one per whole-dataset "
        f"stage, one finalize per stage; a failed shard task is retried once) in {t['flow_runs']} flow runs.",
        f"Largest task parameter: {lp['stage']} {lp['task']}: pickle {human_bytes(lp['pickle_bytes'])}, JSON "
        f"{human_bytes(lp['json_bytes'])} -- {verdict} Prefect Cloud's {limit} limit (each shard task carries "
        "its own shard only);",
        f"  parameters Prefect stores for the run: {human_bytes(t['param_json_bytes_total'])} (JSON, all tasks "
        "and stage subflows).",
        "Pairs are an upper bound (input groups whose candidates all tie give none); storage excludes the HR "
        "photos themselves and Prefect's database.",
    ]
    if plan["unmodelled_stages"]:
        lines.append(f"No cost model (not in the totals): {', '.join(plan['unmodelled_stages'])}.")
    lines += ["", "Figures (override any with --set-cost KEY=VALUE):"]
    width = max(len(f["key"]) for f in plan["figures"])
    for f in plan["figures"]:
        lines.append(f"  {f['key']:<{width}} = {f['value']:<10.5g} {f['unit']}  [{', '.join(f['stages'])}]")
        lines.append(f"  {'':<{width}}   {f['source']}")
    return "\n".join(line.rstrip() for line in lines)


# ---- command line ----------------------------------------------------------------------------------------------


def parse_costs(items: list[str] | None) -> dict[str, float]:
    """`["sample.s_per_candidate=0.3"]` -> {"sample.s_per_candidate": 0.3}."""
    out: dict[str, float] = {}
    for item in items or []:
        key, _, raw = item.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = None
        if value is None or not key.strip():
            raise ConfigError(f"--set-cost {item!r}: expected KEY=NUMBER, e.g. sample.s_per_candidate=0.3")
        out[key.strip()] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dp2o plan` (the caller adds --config and --set, as for every subcommand)."""
    parser.add_argument(
        "--inputs",
        type=int,
        metavar="N",
        help="HR photos to plan for (default: count degrade.input when it is bundled or a local path)",
    )
    parser.add_argument(
        "--gpu",
        choices=sorted(GPU_KINDS),
        default="h100",
        help="GPU kind; speeds relative to the measured H100 are assumptions (default h100)",
    )
    parser.add_argument(
        "--price-per-gpu-hour",
        type=float,
        metavar="USD",
        help="price of one GPU-hour (default: per GPU kind)",
    )
    parser.add_argument(
        "--price-per-cpu-hour",
        type=float,
        metavar="USD",
        help=f"price of one CPU core-hour (default {CPU_PRICE_PER_CORE_HOUR})",
    )
    parser.add_argument(
        "--set-cost",
        dest="set_cost",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one figure of the plan, e.g. --set-cost sample.s_per_candidate=0.3 (repeatable; the "
        "plan lists every key)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the plan of `args.config` (with `args.overrides`, the --set values). Bad arguments raise
    ConfigError, which the CLI reports."""
    config = getattr(args, "config", None)
    cfg = load_config(PipelineConfig, config, parse_overrides(getattr(args, "overrides", None)))
    plan = estimate(
        cfg,
        args.inputs,
        gpu=args.gpu,
        price_per_gpu_hour=args.price_per_gpu_hour,
        price_per_cpu_hour=args.price_per_cpu_hour,
        costs=parse_costs(args.set_cost),
        config_name=config,
    )
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
