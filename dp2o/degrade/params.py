"""Sampled degradation parameters: drawing them from a seed, and storing them as one flat table row.

Every random choice of the chain — kernels, resize, noise kind and level, the seed of the noise field, JPEG
qualities, the order of the final steps — is drawn here, up front, so the pipeline itself is a deterministic
function of (HR image, parameters) and any LR can be regenerated from its Parquet row alone.

Seeds: the caller passes one per-sample seed (the stage uses `derive_seed(global_seed, "degrade", sample_id)`)
to both `crop_origin` (in `ingest`) and `sample_params`; each derives its own sub-streams with
`dp2o.seeding.derive_seed(seed, "degrade", <part>)` — one per round, one for the final step, one per noise
field — so changing one knob (say `second_order_prob`) does not reshuffle the draws of the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa

from dp2o.degrade.config import DegradationConfig, RoundConfig
from dp2o.degrade.kernels import GAUSSIAN_FAMILY, KERNEL_KINDS
from dp2o.seeding import derive_seed, numpy_rng


@dataclass(frozen=True)
class KernelParams:
    """One blur kernel. `kind` is a Gaussian-family kind or "sinc"; fields that do not apply are None."""

    kind: str
    size: int
    sigma_x: float | None = None
    sigma_y: float | None = None
    theta: float | None = None
    beta: float | None = None
    omega: float | None = None


@dataclass(frozen=True)
class RoundParams:
    """One round. blur None = no blur; resize_scale is relative to the round's input or to the LR size
    (see `RoundConfig.resize_reference`); noise_sigma is set for Gaussian noise, poisson_scale for Poisson."""

    blur: KernelParams | None
    resize: str
    resize_scale: float
    resize_mode: str
    noise: str
    noise_sigma: float | None
    poisson_scale: float | None
    noise_gray: bool
    noise_seed: int
    jpeg_quality: float


@dataclass(frozen=True)
class DegradationParams:
    """Every sampled parameter for one sample. `second` is None when the second round was skipped;
    `final_sinc` None means no final sinc filter; `final_jpeg_last` says whether the last round's JPEG comes
    after (True) or before (False) the final resize + sinc."""

    first: RoundParams
    second: RoundParams | None
    final_sinc: KernelParams | None
    final_resize_mode: str
    final_jpeg_last: bool

    def to_row(self) -> dict[str, bool | int | float | str | None]:
        """A flat dict with the fixed keys of `params_arrow_fields()`; absent parts are None."""
        row: dict[str, bool | int | float | str | None] = {}
        for prefix, rnd in (("r1_", self.first), ("r2_", self.second)):
            row.update(_kernel_row(f"{prefix}blur_", rnd.blur if rnd else None))
            for f in fields(RoundParams):
                if f.name != "blur":
                    row[prefix + f.name] = getattr(rnd, f.name) if rnd else None
        row["second_order"] = self.second is not None
        row.update(_kernel_row("final_sinc_", self.final_sinc))
        row["final_resize_mode"] = self.final_resize_mode
        row["final_jpeg_last"] = self.final_jpeg_last
        return row

    @staticmethod
    def from_row(row: Mapping) -> DegradationParams:
        """The inverse of `to_row`; extra keys in `row` (other columns of the table) are ignored."""
        missing = [name for name in _ROW_TYPES if name not in row]
        if missing:
            raise KeyError(f"degradation row is missing columns {missing}; was it written by to_row()?")

        def round_from(prefix: str) -> RoundParams:
            values = {f.name: row[prefix + f.name] for f in fields(RoundParams) if f.name != "blur"}
            values["noise_gray"] = bool(values["noise_gray"])
            values["noise_seed"] = int(values["noise_seed"])
            return RoundParams(blur=_kernel_from_row(row, f"{prefix}blur_"), **values)

        return DegradationParams(
            first=round_from("r1_"),
            second=round_from("r2_") if row["second_order"] else None,
            final_sinc=_kernel_from_row(row, "final_sinc_"),
            final_resize_mode=str(row["final_resize_mode"]),
            final_jpeg_last=bool(row["final_jpeg_last"]),
        )


_KERNEL_TYPES = {f.name: f.type for f in fields(KernelParams)}


def _kernel_row(prefix: str, k: KernelParams | None) -> dict:
    return {prefix + name: (getattr(k, name) if k else None) for name in _KERNEL_TYPES}


def _kernel_from_row(row: Mapping, prefix: str) -> KernelParams | None:
    if row[prefix + "kind"] is None:
        return None
    values = {name: row[prefix + name] for name in _KERNEL_TYPES}
    values["size"] = int(values["size"])
    return KernelParams(**values)


def _arrow_type(annotation: str) -> pa.DataType:
    base = annotation.split("|")[0].strip()
    return {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}[base]


def _row_types() -> dict[str, pa.DataType]:
    types: dict[str, pa.DataType] = {}
    round_fields = [(f.name, f.type) for f in fields(RoundParams) if f.name != "blur"]
    for prefix in ("r1_", "r2_"):
        types.update({f"{prefix}blur_{n}": _arrow_type(t) for n, t in _KERNEL_TYPES.items()})
        types.update({prefix + n: _arrow_type(t) for n, t in round_fields})
    types["second_order"] = pa.bool_()
    types.update({f"final_sinc_{n}": _arrow_type(t) for n, t in _KERNEL_TYPES.items()})
    types["final_resize_mode"] = pa.string()
    types["final_jpeg_last"] = pa.bool_()
    return types


_ROW_TYPES = _row_types()


def params_arrow_fields() -> list[pa.Field]:
    """The pyarrow fields of `DegradationParams.to_row()`, in its key order (all nullable)."""
    return [pa.field(name, t, nullable=True) for name, t in _ROW_TYPES.items()]


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _choice(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    # sorted, not insertion order: a config read from YAML (keys sorted) and the same config built in Python
    # have equal fingerprints, so they must draw the same parameters
    names = sorted(weights)
    p = np.array([weights[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _shape_beta(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    # BasicSR's rule: half the time from [low, 1], half from [1, high]. With low = 1 (plateau's default
    # [1, 2]) the lower half is exactly 1, a point mass we keep so the kernels match Real-ESRGAN's. The pivot
    # is clipped into the range so that ranges not straddling 1 stay inside their bounds.
    lo, hi = bounds
    pivot = min(max(1.0, lo), hi)
    if rng.uniform() < 0.5:
        return float(rng.uniform(lo, pivot))
    return float(rng.uniform(pivot, hi))


def _sample_kernel(rng: np.random.Generator, rc: RoundConfig) -> KernelParams:
    size = int(rc.kernel_sizes[int(rng.integers(len(rc.kernel_sizes)))])
    if rng.uniform() < rc.sinc_prob:
        omega_range = rc.sinc_omega_small if size < rc.sinc_size_threshold else rc.sinc_omega_large
        return KernelParams("sinc", size, omega=_uniform(rng, omega_range))
    kind = _choice(rng, rc.kernel_probs)
    sigma_x = _uniform(rng, rc.blur_sigma)
    if kind.endswith("aniso"):
        sigma_y, theta = _uniform(rng, rc.blur_sigma), _uniform(rng, rc.rotation_range)
    else:
        sigma_y, theta = sigma_x, 0.0
    beta = None
    if kind.startswith("generalized"):
        beta = _shape_beta(rng, rc.betag_range)
    elif kind.startswith("plateau"):
        beta = _shape_beta(rng, rc.betap_range)
    return KernelParams(kind, size, sigma_x=sigma_x, sigma_y=sigma_y, theta=theta, beta=beta)


def _sample_round(seed: int, index: int, rc: RoundConfig) -> RoundParams:
    rng = numpy_rng(derive_seed(seed, "degrade", "round", index))
    blur = _sample_kernel(rng, rc) if rng.uniform() < rc.blur_prob else None
    direction = _choice(rng, rc.resize_probs)
    if direction == "up":
        scale = float(rng.uniform(1.0, rc.resize_range[1]))
    elif direction == "down":
        scale = float(rng.uniform(rc.resize_range[0], 1.0))
    else:
        scale = 1.0
    mode = rc.resize_modes[int(rng.integers(len(rc.resize_modes)))]
    gaussian = bool(rng.uniform() < rc.gaussian_noise_prob)
    level = _uniform(rng, rc.noise_range if gaussian else rc.poisson_scale_range)
    gray = bool(rng.uniform() < rc.gray_noise_prob)
    return RoundParams(
        blur=blur,
        resize=direction,
        resize_scale=scale,
        resize_mode=mode,
        noise="gaussian" if gaussian else "poisson",
        noise_sigma=level if gaussian else None,
        poisson_scale=None if gaussian else level,
        noise_gray=gray,
        noise_seed=derive_seed(seed, "degrade", "noise", index),
        jpeg_quality=_uniform(rng, rc.jpeg_range),
    )


def sample_params(cfg: DegradationConfig, seed: int) -> DegradationParams:
    """Draw every parameter of the chain for one sample from `seed` (no global RNG is touched)."""
    first = _sample_round(seed, 1, cfg.first)
    rng = numpy_rng(derive_seed(seed, "degrade", "final"))
    second = _sample_round(seed, 2, cfg.second) if rng.uniform() < cfg.second_order_prob else None
    final_sinc = None
    if rng.uniform() < cfg.final_sinc_prob:
        size = int(cfg.final_sinc_sizes[int(rng.integers(len(cfg.final_sinc_sizes)))])
        final_sinc = KernelParams("sinc", size, omega=_uniform(rng, cfg.final_sinc_omega))
    return DegradationParams(
        first=first,
        second=second,
        final_sinc=final_sinc,
        final_resize_mode=cfg.final_resize_modes[int(rng.integers(len(cfg.final_resize_modes)))],
        final_jpeg_last=bool(rng.uniform() < cfg.final_jpeg_last_prob),
    )


def validate_params(p: DegradationParams) -> None:
    """Raise ValueError naming the column if `p` (e.g. read back from a table) cannot drive the pipeline."""
    kernels = {
        "r1_blur": p.first.blur,
        "r2_blur": p.second.blur if p.second else None,
        "final_sinc": p.final_sinc,
    }
    for name, k in kernels.items():
        if k is None:
            continue
        if k.kind not in KERNEL_KINDS:
            raise ValueError(f"{name}_kind={k.kind!r} is not one of {KERNEL_KINDS}")
        if k.size < 1 or k.size % 2 == 0:
            raise ValueError(f"{name}_size={k.size} must be a positive odd integer")
        need = ["omega"] if k.kind == "sinc" else ["sigma_x", "sigma_y", "theta"]
        if k.kind in GAUSSIAN_FAMILY and k.kind.startswith(("generalized", "plateau")):
            need.append("beta")
        absent = [f"{name}_{f}" for f in need if getattr(k, f) is None]
        if absent:
            raise ValueError(f"{name}: kind {k.kind!r} needs columns {absent}")
    for name, r in (("r1", p.first), ("r2", p.second)):
        if r is None:
            continue
        if r.noise not in ("gaussian", "poisson"):
            raise ValueError(f"{name}_noise={r.noise!r} must be 'gaussian' or 'poisson'")
        level = r.noise_sigma if r.noise == "gaussian" else r.poisson_scale
        if level is None:
            column = "noise_sigma" if r.noise == "gaussian" else "poisson_scale"
            raise ValueError(f"{name}_{column} is missing for {r.noise} noise")
        if not 1 <= r.jpeg_quality <= 100:
            raise ValueError(f"{name}_jpeg_quality={r.jpeg_quality} must be in [1, 100]")
        if r.resize_scale <= 0:
            raise ValueError(f"{name}_resize_scale={r.resize_scale} must be positive")


__all__ = [
    "DegradationParams",
    "KernelParams",
    "RoundParams",
    "params_arrow_fields",
    "sample_params",
    "validate_params",
]


#: (description, unit) of each kernel and round field, for the Parquet column docs
_KERNEL_DOCS = {
    "kind": ("kernel type (iso, aniso, generalized_*, plateau_*, or sinc); null = none", ""),
    "size": ("kernel side", "px"),
    "sigma_x": ("Gaussian-family kernel's sigma along its first axis", "px"),
    "sigma_y": ("Gaussian-family kernel's sigma along its second axis", "px"),
    "theta": ("kernel rotation", "rad"),
    "beta": ("shape exponent of a generalized or plateau kernel", ""),
    "omega": ("sinc kernel's cutoff frequency", "rad"),
}
_ROUND_DOCS = {
    "resize": ("up, down or keep", ""),
    "resize_scale": ("resize factor (relative to the round's input or the LR size, per the config)", ""),
    "resize_mode": ("interpolation of the resize (area, bilinear, bicubic)", ""),
    "noise": ("noise kind: gaussian or poisson", ""),
    "noise_sigma": ("Gaussian noise standard deviation, on the 0-255 scale; null for Poisson", "/255"),
    "poisson_scale": ("Poisson noise scale; null for Gaussian", ""),
    "noise_gray": ("the noise is the same on all channels", ""),
    "noise_seed": ("seed of the noise draw", ""),
    "jpeg_quality": ("JPEG quality of the round's compression", "JPEG quality 0-100"),
}
_FINAL_DOCS = {
    "second_order": ("the second round was applied", ""),
    "final_resize_mode": ("interpolation of the resize to the LR size", ""),
    "final_jpeg_last": ("the last JPEG came after (true) or before (false) the final resize + sinc", ""),
}


def params_column_docs() -> dict[str, tuple[str, str]]:
    """{column of `params_arrow_fields()`: (description, unit)}, every column documented."""
    docs: dict[str, tuple[str, str]] = {}
    for prefix, what in (("r1_", "first round"), ("r2_", "second round (null when skipped)")):
        for n, (d, u) in _KERNEL_DOCS.items():
            docs[f"{prefix}blur_{n}"] = (f"{what}, blur: {d}", u)
        for n, (d, u) in _ROUND_DOCS.items():
            docs[prefix + n] = (f"{what}: {d}", u)
    for n, (d, u) in _KERNEL_DOCS.items():
        docs[f"final_sinc_{n}"] = (f"final sinc filter (null when not applied): {d}", u)
    docs.update(_FINAL_DOCS)
    return {name: docs[name] for name in _ROW_TYPES}
