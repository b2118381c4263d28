"""Typed, frozen configuration for every stage, and the fingerprints that address stage outputs.

A stage's output folder is named by `fingerprint(stage, config, upstream)`: a hash of the stage name, its code
version, the canonical JSON of the config *without runtime-only fields* (device, batch sizes that do not change
results, credentials), and the upstream fingerprints. Change anything that changes results and the output moves
to a new folder; change only how fast it runs and the cached result is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dp2o.degrade.config import DegradationConfig
from dp2o.errors import Dp2oError
from dp2o.models.config import BackendConfig, runtime
from dp2o.reward.hybrid import RewardConfig
from dp2o.reward.registry import check_metric_weights, metric_names
from dp2o.urls import url_problem


class ConfigError(Dp2oError, ValueError):
    """A config is malformed. Raised before any work starts; the message names the field and the source."""


def _is_number_type(annotation: Any) -> bool:
    """int, float, or an optional / union of them (not bool, which pydantic would otherwise read as 0/1)."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) not in (Union, UnionType):
        return False
    return all(a in (int, float, type(None)) for a in get_args(annotation))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML's `true`/`yes` would pass as 1 (`steps: yes` = one step): a number field wants a number
        if isinstance(value, bool) and _is_number_type(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


# ---- checks shared by several sections (plain functions: a validator calls them and raises ValueError) -------

#: device names the stages accept (torch's, plus `auto`); checked here because torch is not imported yet
_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu|npu|hpu)(:\d+)?)$")


def _check_device(value: str, field: str | None = None) -> str:
    """`field` is named in the message when the check runs outside the field's own validator."""
    if not _DEVICE.match(value):
        hint = " (did you mean cuda?)" if str(value).lower().startswith("gpu") else ""
        name = f"{field}=" if field else ""
        raise ValueError(f"{name}{value!r} is not a device{hint}; use auto, cpu, cuda, cuda:N or mps")
    return value


def _check_metrics(value: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """Metric or preset names must exist (from the metric table, which is data: no torch or pyiqa)."""
    metric_names(value)
    return value


#: storage-option names (lower-cased, `_`/`-`/`.` removed) that hold credentials -> the variable to use instead
_SECRET_ENV = {
    "key": "AWS_ACCESS_KEY_ID",
    "accesskey": "AWS_ACCESS_KEY_ID",
    "accesskeyid": "AWS_ACCESS_KEY_ID",
    "awsaccesskeyid": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
    "secretkey": "AWS_SECRET_ACCESS_KEY",
    "secretaccesskey": "AWS_SECRET_ACCESS_KEY",
    "awssecretaccesskey": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN",
    "sessiontoken": "AWS_SESSION_TOKEN",
    "awssessiontoken": "AWS_SESSION_TOKEN",
    "securitytoken": "AWS_SESSION_TOKEN",
}
#: parts of a name that mark it as a credential whatever the filesystem
_SECRET_PARTS = (
    "secret",
    "password",
    "passwd",
    "token",
    "credential",
    "apikey",
    "accesskey",
    "accountkey",
    "privatekey",
    "customerkey",
    "connectionstring",
)
_SECRET_EXACT = {"pwd", "auth", "creds", "signature"}


def _secret_env(name: str) -> str | None:
    """The environment variable (or advice) for a credential-like storage-option name; None if it is not one."""
    n = re.sub(r"[^a-z0-9]", "", str(name).lower())
    if n in _SECRET_ENV:
        return _SECRET_ENV[n]
    if "secret" in n and "access" in n:
        return "AWS_SECRET_ACCESS_KEY"
    if "accesskey" in n:
        return "AWS_ACCESS_KEY_ID"
    if "token" in n and ("session" in n or "security" in n):
        return "AWS_SESSION_TOKEN"
    if n in _SECRET_EXACT or any(part in n for part in _SECRET_PARTS):
        return "the filesystem's own environment variables or credentials file"
    return None


def secret_storage_options(options: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, where the credential belongs) for every credential-like key in `options`, nested ones
    (client_kwargs, config_kwargs, ...) included. Values are never looked at, so they never reach a message."""
    found = []
    for k, v in options.items():
        dotted = f"{prefix}{k}"
        env = _secret_env(k)
        if env is not None:
            found.append((dotted, env))
        elif isinstance(v, Mapping):
            found.extend(secret_storage_options(v, dotted + "."))
    return found


def check_storage_options(options: Mapping[str, Any], source: str = "storage_options") -> None:
    """Refuse credentials in storage options (they would travel as Prefect parameters and be stored in its
    database) and malformed endpoints. Raises ValueError naming `source` and the environment variable to use."""

    def label(dotted: str) -> str:
        return f"{source} {dotted}" if source.startswith("--") else f"{source}.{dotted}"

    secrets = secret_storage_options(options)
    if secrets:
        advice = "; ".join(
            f"{label(name)}: set {env} in the environment"
            if env.startswith("AWS_")
            else f"{label(name)}: use {env}"
            for name, env in secrets
        )
        raise ValueError(
            f"credentials must not be storage options (they would travel as run parameters, which Prefect stores "
            f"in its database): {advice}. s3fs/botocore read AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_SESSION_TOKEN and AWS_ENDPOINT_URL from the environment, or a profile of ~/.aws/credentials "
            "(AWS_PROFILE)"
        )
    for dotted, value in _endpoint_values(options):
        parts = urlsplit(value) if isinstance(value, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            shown = value if isinstance(value, str) else type(value).__name__
            raise ValueError(
                f"{label(dotted)}={shown!r} must be an http:// or https:// URL with a host, "
                "e.g. http://localhost:9000"
            )
        try:
            parts.port  # noqa: B018 (raises ValueError for a malformed port)
        except ValueError:
            raise ValueError(f"{label(dotted)}={value!r} has a malformed port") from None


def _endpoint_values(options: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in options.items():
        if isinstance(v, Mapping):
            out.extend(_endpoint_values(v, f"{prefix}{k}."))
        elif str(k) in ("endpoint_url", "endpoint"):
            out.append((f"{prefix}{k}", v))
    return out


def _check_location(value: str, *, output: bool, extra: tuple[str, ...] = ()) -> str:
    problem = url_problem(value, output=output, extra_schemes=extra)
    if problem:
        raise ValueError(problem)
    return value


def _non_finite(value: Any, path: str) -> list[str]:
    """Dotted paths of NaN/inf floats anywhere in a config (nested models included)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, BaseModel):
        return [
            p
            for name in type(value).model_fields
            for p in _non_finite(getattr(value, name), f"{path}.{name}")
        ]
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _non_finite(v, f"{path}.{k}")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{path}[{i}]")]
    return []


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
    degradation: DegradationConfig = Field(DegradationConfig())
    max_failed_fraction: float = runtime(
        default=0.5, ge=0, le=1, description="fail the stage if a larger fraction of rows are errors"
    )
    batch_size: int = runtime(default=16, ge=1, description="crops degraded per torch call")
    device: str = runtime(default="cpu", description="torch device for the degradation ops")

    @field_validator("input")
    @classmethod
    def _input_location(cls, value: str) -> str:
        from dp2o.data import BUNDLED_PHOTOS, BUNDLED_SCHEME

        _check_location(value, output=False, extra=("bundled",))
        if value.startswith(BUNDLED_SCHEME):
            split = value[len(BUNDLED_SCHEME) :].strip("/")
            if split not in (*BUNDLED_PHOTOS, "all"):
                raise ValueError(
                    f"{value!r}: unknown bundled photo set {split!r}; use one of "
                    + ", ".join(f"{BUNDLED_SCHEME}{s}" for s in [*BUNDLED_PHOTOS, "all"])
                )
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)

    @model_validator(mode="after")
    def _min_size_covers_crop(self):
        if self.min_size is not None and self.min_size < self.crop_size:
            raise ValueError(
                f"degrade.min_size={self.min_size} is below degrade.crop_size={self.crop_size}: a photo smaller "
                f"than the crop cannot be cropped; set min_size to at least {self.crop_size} or leave it unset"
            )
        return self

    @model_validator(mode="after")
    def _crop_fits_chain(self):
        from dp2o.degrade.config import min_hr_side

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

    backend: BackendConfig = Field(BackendConfig())
    num_candidates: int = Field(32, ge=2, description="M, candidates per LR input")
    seed: int = Field(0, description="global seed; candidate seeds derive from (seed, sample id, candidate)")
    max_failed_fraction: float = runtime(
        default=0.0, ge=0, le=1, description="fail the stage if a larger fraction of rows are errors"
    )
    batch_size: int = runtime(default=8, ge=1, description="(LR, seed) rows per denoising batch")

    @model_validator(mode="after")
    def _backend_device(self):
        _check_device(self.backend.device, "sample.backend.device")
        return self


class _ScoredWithReward(_Frozen):
    """Checks shared by sections that score with `metrics` and weigh them with `reward` (score, evaluate)."""

    @field_validator("metrics", check_fields=False)
    @classmethod
    def _known_metrics(cls, value):
        return _check_metrics(value)

    @field_validator("device", check_fields=False)
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)

    @model_validator(mode="after")
    def _weights_name_metrics(self):
        check_metric_weights(self.reward.metric_weights, self.metrics)
        return self


class ScoreConfig(_ScoredWithReward):
    """IQA metrics per candidate (raw columns) and the hybrid reward computed from them."""

    metrics: str | tuple[str, ...] = Field(
        "offline", description="a preset name (paper, offline) or metric names"
    )
    batch_size: int = Field(
        8, ge=1, description="scoring batch size; fingerprinted because some learned metrics depend on it"
    )
    reward: RewardConfig = Field(RewardConfig())
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

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"both must be in [0, 1), got {value}; Adam's default is (0.9, 0.999)")
        return value

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


class EvaluateConfig(_ScoredWithReward):
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
    reward: RewardConfig = Field(RewardConfig())
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

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value in ("auto", "local"):
            return value
        rest = value[len("ray://") :] if value.startswith("ray://") else value
        host, sep, port = rest.rpartition(":")
        ok = bool(sep) and bool(host) and port.isdigit() and 0 < int(port) < 65536 and "/" not in host
        if value.startswith("ray://") and not sep:
            ok = bool(rest) and "/" not in rest
        if not ok or any(c.isspace() for c in value):
            raise ValueError(
                f"{value!r} is not a Ray address; use auto, ray://HOST:10001 (Ray client) or "
                "HOST:6379 (a cluster's GCS), or leave it unset for a local Ray instance"
            )
        return value


class PipelineConfig(_Frozen):
    """The whole chain. `root` is a local folder or any fsspec URL (s3://bucket/prefix)."""

    root: str = Field("runs/demo", description="run root; every stage writes ROOT/STAGE/FINGERPRINT/")
    storage_options: dict[str, Any] = runtime(
        default={},
        description="fsspec options (endpoint_url, region, anon, ...); never credentials: they come from the "
        "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or ~/.aws/credentials",
    )
    degrade: DegradeConfig = Field(DegradeConfig())
    sample: SampleConfig = Field(SampleConfig())
    score: ScoreConfig = Field(ScoreConfig())
    pairs: PairsConfig = Field(PairsConfig())
    train: TrainConfig = Field(TrainConfig())
    evaluate: EvaluateConfig = Field(EvaluateConfig())
    workers: int = runtime(
        default=1, ge=1, description="shards processed concurrently in threads, where the stage allows it"
    )
    executor: Literal["local", "ray"] = runtime(
        default="local",
        description="local: this process (threads); ray: shards fanned out over a Ray cluster",
    )
    ray: RayConfig = runtime(default=RayConfig(), description="the Ray executor's settings")
    shard_index: int | None = runtime(
        default=None, ge=0, description="with num_shards: this process computes only shards i, i+n, i+2n, ..."
    )
    num_shards: int = runtime(
        default=1, ge=1, description="processes sharing every stage's shards (partitions)"
    )

    @field_validator("root")
    @classmethod
    def _root_location(cls, value: str) -> str:
        return _check_location(value, output=True)

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_storage_options(value)
        return value

    @model_validator(mode="after")
    def _finite_numbers(self):
        # sections of other modules (degradation, backend) accept inf/nan by default; refuse them everywhere
        bad = [p.lstrip(".") for p in _non_finite(self, "")]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be a finite number (got NaN or infinity)")
        return self

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


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config class that holds the last element of `loc` (None if the path leaves the config classes)."""
    for part in loc[:-1]:
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        candidates = [info.annotation, *getattr(info.annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    import difflib

    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and model is not None and e["loc"]:
            holder = _model_at(model, e["loc"])
            if holder is not None:
                known = list(holder.model_fields)
                close = difflib.get_close_matches(str(e["loc"][-1]), known, n=2, cutoff=0.6)
                msg = f"unknown field{' (did you mean ' + ' or '.join(close) + '?)' if close else ''}; " + (
                    f"{holder.__name__} has: {', '.join(known)}"
                )
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any, flag: str = "--set") -> None:
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(
            f"{flag} {dotted!r}: empty name in the dotted key; write e.g. sample.num_candidates"
        )
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{flag} {dotted}: {k!r} is not a section")
    if keys[-1] in node and isinstance(node[keys[-1]], dict) != isinstance(value, dict):
        raise ConfigError(f"{flag} {dotted}: {keys[-1]!r} is given both as a section and as a value")
    node[keys[-1]] = value


def parse_overrides(
    items: list[str] | None, flag: str = "--set", example: str = "sample.num_candidates=8"
) -> dict:
    """`["sample.num_candidates=8", "pairs.weighting=uniform"]` -> nested dict (values parsed as YAML).

    flag/example name the command-line option in messages (`--storage-option` parses the same way)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {example}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problem = str(getattr(e, "problem", None) or e).strip()
            raise ConfigError(
                f"{flag} {key.strip()}=...: the value is not valid YAML ({problem}); quote strings that "
                "contain [ ] { } : or #"
            ) from None
        _set_dotted(out, key.strip(), value, flag)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(config: BaseModel, overrides: list[str] | None) -> BaseModel:
    """`config` with dotted KEY=VALUE overrides (the CLI's --set form) merged in and validated again."""
    if not overrides:
        return config
    data = deep_merge(config.model_dump(mode="json"), parse_overrides(overrides))
    try:
        return type(config).model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, "overrides")) from None


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
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text; give a YAML or JSON file") from None
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
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
        raise ConfigError(_format_validation_error(e, source, model)) from None
