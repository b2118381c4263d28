"""Typed, frozen configuration for every stage, and the fingerprints that address stage outputs.

A stage's output folder is named by `fingerprint(stage, config, upstream)`: a hash of the stage name, its code
version, the canonical JSON of the config *without runtime-only fields* (device, batch sizes that do not change
results, credentials), and the upstream fingerprints. Change anything that changes results and the output moves
to a new folder; change only how fast it runs and the cached result is reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dp2o.degrade.config import DegradationConfig
from dp2o.errors import Dp2oError
from dp2o.models.config import BackendConfig, runtime
from dp2o.reward.hybrid import RewardConfig


class ConfigError(Dp2oError, ValueError):
    """A config is malformed. Raised before any work starts; the message names the field and the source."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DegradeConfig(_Frozen):
    """HR photos -> random crops -> Real-ESRGAN-style degradation -> LR/HR pairs."""

    input: str = Field(
        "bundled://train", description="HR source: folder, fsspec URL, webdataset shards, or bundled://"
    )
    crop_size: int = Field(
        512, ge=16, description="HR crop side in pixels (a multiple of the degradation scale)"
    )
    crops_per_image: int = Field(1, ge=1, description="random crops taken from each HR photo")
    min_size: int | None = Field(None, ge=1, description="reject photos smaller than this; None = crop_size")
    images_per_shard: int = Field(64, ge=1, description="HR photos per output shard")
    seed: int = Field(
        0, description="global seed; each sample's crop and parameters derive from (seed, sample id)"
    )
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    max_failed_fraction: float = runtime(
        default=0.5, ge=0, le=1, description="fail the stage if a larger fraction of rows are errors"
    )
    batch_size: int = runtime(default=16, ge=1, description="crops degraded per torch call")
    device: str = runtime(default="cpu", description="torch device for the degradation ops")

    @model_validator(mode="after")
    def _crop_fits_chain(self):
        from dp2o.degrade.pipeline import min_hr_side

        if self.crop_size % self.degradation.scale:
            raise ValueError(
                f"crop_size={self.crop_size} must be a multiple of degradation.scale={self.degradation.scale}"
            )
        smallest = min_hr_side(self.degradation)
        if self.crop_size < smallest:
            raise ValueError(
                f"crop_size={self.crop_size} is too small for this degradation chain (its resizes and blur "
                f"kernels need HR crops of at least {smallest} px)"
            )
        return self


class SampleConfig(_Frozen):
    """M candidates per LR input from a Real-ISR backend, one recorded seed each."""

    backend: BackendConfig = Field(default_factory=BackendConfig)
    num_candidates: int = Field(32, ge=2, description="M, candidates per LR input")
    seed: int = Field(0, description="global seed; candidate seeds derive from (seed, sample id, candidate)")
    max_failed_fraction: float = runtime(
        default=0.0, ge=0, le=1, description="fail the stage if a larger fraction of rows are errors"
    )
    batch_size: int = runtime(default=8, ge=1, description="(LR, seed) rows per denoising batch")


class ScoreConfig(_Frozen):
    """IQA metrics per candidate (raw columns) and the hybrid reward computed from them."""

    metrics: str | tuple[str, ...] = Field(
        "offline", description="a preset name (paper, offline) or metric names"
    )
    batch_size: int = Field(
        8, ge=1, description="scoring batch size; fingerprinted because some learned metrics depend on it"
    )
    reward: RewardConfig = Field(default_factory=RewardConfig)
    device: str = runtime(default="auto", description="auto = cuda if available else cpu")


class PairsConfig(_Frozen):
    """Top-N x bottom-N preference pairs per LR input with HPO weights."""

    n_top: int = Field(8, ge=1, description="N: winners are the top N, losers the bottom N of each group")
    weighting: Literal["hpo", "uniform"] = Field("hpo", description="hierarchical weights or weight 1")


class TrainConfig(_Frozen):
    """Weighted Diffusion-DPO of the sampling backend against its frozen copy."""

    steps: int = Field(1000, ge=1, description="optimiser steps")
    pairs_per_step: int = Field(1024, ge=1, description="pairs per optimiser step (by gradient accumulation)")
    micro_batch: int = runtime(default=8, ge=1, description="pairs per forward/backward pass")
    learning_rate: float = Field(2e-5, gt=0)
    beta: float | None = Field(
        None, gt=0, description="DPO beta; None = backend default (5000 for diffusion)"
    )
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None = off")
    timestep_range: tuple[float, float] = Field(
        (0.0, 1.0),
        description="fractions (lo, hi) of the noise schedule DPO draws training timesteps from; "
        "(0, 1) = all of it (Diffusion-DPO); see docs/train.md",
    )
    seed: int = Field(0, description="pair order, timesteps and noise derive from (seed, step)")
    checkpoint_every: int = runtime(default=100, ge=1, description="steps between full-state checkpoints")
    keep_last: int = runtime(default=2, ge=1, description="complete checkpoints kept")
    log_every: int = runtime(default=10, ge=1, description="steps between printed log lines")
    num_processes: int = runtime(
        default=1,
        ge=1,
        description="data-parallel training processes on this machine (one per GPU; gloo on CPU); the global "
        "batch stays pairs_per_step, so the result does not depend on it beyond float summation order",
    )

    @model_validator(mode="after")
    def _timestep_range_ordered(self):
        lo, hi = self.timestep_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"train.timestep_range must satisfy 0 <= lo < hi <= 1, got ({lo}, {hi})")
        return self

    @model_validator(mode="after")
    def _every_process_has_work(self):
        # processes split a step's micro-batches (the unit its noise is drawn for), so each needs at least one
        per_step = -(-self.pairs_per_step // self.micro_batch)
        if self.num_processes > per_step:
            raise ValueError(
                f"train.num_processes={self.num_processes} needs at least that many micro-batches per step, but "
                f"pairs_per_step={self.pairs_per_step} in micro-batches of {self.micro_batch} gives {per_step}; "
                f"lower train.micro_batch to at most {max(1, self.pairs_per_step // self.num_processes)} or "
                f"train.num_processes to at most {per_step}"
            )
        return self


class EvaluateConfig(_Frozen):
    """M candidates per held-out input from the base and the tuned model, scored, Best/Mean/Worst@M side by side."""

    num_candidates: int = Field(8, ge=1, description="M, candidates per held-out input and model")
    seed: int = Field(
        0,
        description="evaluation seed; candidate seeds derive from (seed, sample id, candidate), the same for both models",
    )
    metrics: str | tuple[str, ...] = Field(
        "offline",
        description="a preset name (paper, offline) or metric names; FR metrics only where HR exists",
    )
    reward: RewardConfig = Field(default_factory=RewardConfig)
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the t-intervals in the summary")
    batch_size: int = runtime(default=8, ge=1, description="(LR, seed) rows per denoising batch")
    device: str = runtime(default="auto", description="scoring device; auto = cuda if available else cpu")


class RayConfig(_Frozen):
    """Where and how the Ray executor runs a stage's shards (every field is runtime: results do not change)."""

    address: str | None = Field(
        None, description="Ray cluster address (ray://host:10001 or auto); None starts a local Ray instance"
    )
    gpus_per_worker: float = Field(
        1.0, gt=0, description="GPUs per worker of a GPU stage (fractional shares a GPU between workers)"
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker of a CPU stage")
    max_workers: int | None = Field(
        None,
        ge=1,
        description="upper bound on workers per stage; None = as many as the cluster's resources allow",
    )
    max_retries: int = Field(
        2,
        ge=0,
        description="retries of a shard whose worker died or whose body raised, before the stage fails",
    )
    num_cpus: int | None = Field(None, ge=1, description="local instance only: CPUs to declare (None = all)")
    num_gpus: int | None = Field(None, ge=0, description="local instance only: GPUs to declare (None = all)")


class PipelineConfig(_Frozen):
    """The whole chain. `root` is a local folder or any fsspec URL (s3://bucket/prefix)."""

    root: str = Field("runs/demo", description="run root; every stage writes <root>/<stage>/<fingerprint>/")
    storage_options: dict[str, Any] = runtime(
        default_factory=dict, description="fsspec options (credentials, endpoint)"
    )
    degrade: DegradeConfig = Field(default_factory=DegradeConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    workers: int = runtime(
        default=1, ge=1, description="shards processed concurrently in threads, where the stage allows it"
    )
    executor: Literal["local", "ray"] = runtime(
        default="local",
        description="local: this process (threads); ray: shards fanned out over a Ray cluster",
    )
    ray: RayConfig = runtime(default_factory=RayConfig, description="the Ray executor's settings")
    shard_index: int | None = runtime(
        default=None, ge=0, description="with num_shards: this process computes only shards i, i+n, i+2n, ..."
    )
    num_shards: int = runtime(
        default=1, ge=1, description="processes sharing every stage's shards (partitions)"
    )

    @model_validator(mode="after")
    def _partition(self):
        if self.shard_index is not None and self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index={self.shard_index} must be < num_shards={self.num_shards}")
        return self

    @model_validator(mode="after")
    def _pairs_fit(self):
        if 2 * self.pairs.n_top > self.sample.num_candidates:
            raise ValueError(
                f"pairs.n_top={self.pairs.n_top} needs at least 2*N={2 * self.pairs.n_top} candidates, "
                f"but sample.num_candidates={self.sample.num_candidates}"
            )
        return self


# ---- canonical JSON and fingerprints ------------------------------------------------------------------------


def _is_runtime(info) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("runtime"))


def canonical(value: Any) -> Any:
    """JSON-able form of a config with runtime-only fields removed (recursively)."""
    if isinstance(value, BaseModel):
        return {
            name: canonical(getattr(value, name))
            for name, info in type(value).model_fields.items()
            if not _is_runtime(info)
        }
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def runtime_fields(value: BaseModel) -> dict[str, Any]:
    """The runtime-only fields of a config (the complement of `canonical`, one level deep)."""
    return {
        name: getattr(value, name) for name, info in type(value).model_fields.items() if _is_runtime(info)
    }


def canonical_json(value: Any) -> str:
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(stage: str, config: Any, upstream: tuple[str, ...] | list[str] = ()) -> str:
    """16 hex digits naming the output of `stage` run with `config` on the given upstream fingerprints.

    The stage's code version comes from the registry (`Stage.version`): bump it when the stage's code changes
    what it writes; old outputs then stay, new ones get new folders."""
    from dp2o.registry import version

    payload = json.dumps(
        {
            "stage": stage,
            "version": version(stage),
            "config": canonical(config),
            "upstream": list(upstream),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# ---- loading ------------------------------------------------------------------------------------------------


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> dict:
    """`["sample.num_candidates=8", "pairs.weighting=uniform"]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. sample.num_candidates=8")
        key, raw = item.split("=", 1)
        _set_dotted(out, key.strip(), yaml.safe_load(raw))
    return out


def deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_config(model: type[BaseModel], path: str | Path | None = None, overrides: Mapping | None = None):
    """Build `model` from a YAML/JSON file plus overrides; malformed input raises ConfigError naming the field."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must be a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
    if overrides:
        data = deep_merge(data, overrides)
        source += " (with overrides)"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
