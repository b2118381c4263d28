"""Configuration of the Real-ESRGAN second-order degradation: one round schema, used twice.

Defaults are the published Real-ESRGAN x4 training configuration (`train_realesrgan_x4plus.yml` with its
`RealESRGANDataset` kernel options). Where Real-ESRGAN names a key twice with a numeric suffix
(`noise_range` / `noise_range2`) we have one `RoundConfig` and two instances of it, `first` and `second`;
the only behavioural difference between its two rounds — the second round resizes relative to the final
LR size rather than to its input — is the explicit field `RoundConfig.resize_reference`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

KernelKind = Literal["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
ResizeMode = Literal["area", "bilinear", "bicubic"]

#: odd kernel sizes 7..21, as in Real-ESRGAN
DEFAULT_KERNEL_SIZES: tuple[int, ...] = tuple(range(7, 22, 2))

Range = tuple[float, float]


def _check_range(name: str, value: Range, low: float | None = None, high: float | None = None) -> None:
    lo, hi = value
    if lo > hi:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value}")
    if low is not None and lo < low:
        raise ValueError(f"{name} lower bound must be >= {low}, got {value}")
    if high is not None and hi > high:
        raise ValueError(f"{name} upper bound must be <= {high}, got {value}")


def _check_probs(name: str, probs: dict[str, float]) -> None:
    if any(p < 0 for p in probs.values()) or sum(probs.values()) <= 0:
        raise ValueError(f"{name} must hold non-negative weights with a positive sum, got {probs}")


class RoundConfig(BaseModel):
    """One degradation round: blur → random resize → Gaussian or Poisson noise → JPEG."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    blur_prob: float = Field(1.0, ge=0, le=1, description="probability the round blurs at all")
    kernel_sizes: tuple[int, ...] = Field(
        DEFAULT_KERNEL_SIZES, description="odd kernel sizes, drawn uniformly"
    )
    kernel_probs: dict[KernelKind, float] = Field(
        {
            "iso": 0.45,
            "aniso": 0.25,
            "generalized_iso": 0.12,
            "generalized_aniso": 0.03,
            "plateau_iso": 0.12,
            "plateau_aniso": 0.03,
        },
        description="relative weights of the Gaussian-family kernel kinds (used when no sinc kernel is drawn)",
    )
    sinc_prob: float = Field(
        0.1, ge=0, le=1, description="probability the blur kernel is a sinc (circular low-pass)"
    )
    sinc_omega_small: Range = Field(
        (math.pi / 3, math.pi), description="sinc cutoff range (rad) for kernel sizes < sinc_size_threshold"
    )
    sinc_omega_large: Range = Field(
        (math.pi / 5, math.pi), description="sinc cutoff range (rad) for kernel sizes >= sinc_size_threshold"
    )
    sinc_size_threshold: int = Field(13, ge=1, description="kernel size from which sinc_omega_large applies")
    blur_sigma: Range = Field((0.2, 3.0), description="Gaussian sigma range (px), for both axes")
    rotation_range: Range = Field((-math.pi, math.pi), description="anisotropic kernel angle range (rad)")
    betag_range: Range = Field((0.5, 4.0), description="generalized-Gaussian shape range")
    betap_range: Range = Field((1.0, 2.0), description="plateau shape range")
    resize_probs: dict[Literal["up", "down", "keep"], float] = Field(
        {"up": 0.2, "down": 0.7, "keep": 0.1},
        description="weights of resize direction",
    )
    resize_range: Range = Field((0.15, 1.5), description="(min down-scale, max up-scale) factors")
    resize_modes: tuple[ResizeMode, ...] = Field(
        ("area", "bilinear", "bicubic"), description="drawn uniformly"
    )
    resize_reference: Literal["input", "output"] = Field(
        "input",
        description="input: scale the round's input size; output: scale the final LR size (Real-ESRGAN's 2nd round)",
    )
    gaussian_noise_prob: float = Field(
        0.5, ge=0, le=1, description="probability of Gaussian (else Poisson) noise"
    )
    noise_range: Range = Field((1.0, 30.0), description="Gaussian noise sigma range, in 8-bit levels")
    poisson_scale_range: Range = Field((0.05, 3.0), description="Poisson noise scale range")
    gray_noise_prob: float = Field(
        0.4, ge=0, le=1, description="probability the noise is the same on all channels"
    )
    jpeg_range: Range = Field((30.0, 95.0), description="JPEG quality range (continuous, as DiffJPEG)")

    @model_validator(mode="after")
    def _validate(self) -> RoundConfig:
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be a non-empty tuple of odd sizes, got {self.kernel_sizes}")
        if not self.resize_modes:
            raise ValueError("resize_modes must not be empty; use e.g. ('bicubic',)")
        _check_probs("kernel_probs", dict(self.kernel_probs))
        _check_probs("resize_probs", dict(self.resize_probs))
        _check_range("sinc_omega_small", self.sinc_omega_small, 0, math.pi)
        _check_range("sinc_omega_large", self.sinc_omega_large, 0, math.pi)
        _check_range("blur_sigma", self.blur_sigma, 1e-3)
        _check_range("rotation_range", self.rotation_range)
        _check_range("betag_range", self.betag_range, 1e-3)
        _check_range("betap_range", self.betap_range, 1e-3)
        _check_range("noise_range", self.noise_range, 0)
        _check_range("poisson_scale_range", self.poisson_scale_range, 0)
        _check_range("jpeg_range", self.jpeg_range, 1, 100)
        lo, hi = self.resize_range
        if not 0 < lo <= 1 <= hi:
            raise ValueError(
                f"resize_range must be (down, up) with 0 < down <= 1 <= up, got {self.resize_range}"
            )
        return self


def _second_round() -> RoundConfig:
    return RoundConfig(
        blur_prob=0.8,
        blur_sigma=(0.2, 1.5),
        resize_probs={"up": 0.3, "down": 0.4, "keep": 0.3},
        resize_range=(0.3, 1.2),
        resize_reference="output",
        noise_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5),
    )


class USMConfig(BaseModel):
    """Unsharp masking as Real-ESRGAN's `USMSharp`: Gaussian blur of odd size `radius`, soft threshold mask."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    radius: int = Field(
        51, ge=3, description="Gaussian kernel size (odd); Real-ESRGAN asks for 50 and rounds up"
    )
    weight: float = Field(0.5, ge=0, description="sharpening strength")
    threshold: float = Field(
        10.0, ge=0, description="residual threshold in 8-bit levels for the sharpening mask"
    )

    @model_validator(mode="after")
    def _odd(self) -> USMConfig:
        if self.radius % 2 == 0:
            raise ValueError(f"usm.radius must be odd, got {self.radius}; use {self.radius + 1}")
        return self


class DegradationConfig(BaseModel):
    """The whole chain: [USM] → first round → second round (with a probability) → final resize + sinc and the
    last round's JPEG, in random order. Defaults reproduce Real-ESRGAN x4."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: int = Field(4, ge=1, description="HR/LR size ratio; HR sides must be multiples of it")
    first: RoundConfig = Field(RoundConfig(), description="the first round")
    second: RoundConfig = Field(_second_round(), description="the second round")
    second_order_prob: float = Field(
        1.0, ge=0, le=1, description="probability of the second round (Real-ESRGAN always applies it: 1.0)"
    )
    final_sinc_prob: float = Field(0.8, ge=0, le=1, description="probability of the final sinc filter")
    final_sinc_sizes: tuple[int, ...] = Field(
        DEFAULT_KERNEL_SIZES, description="final sinc kernel sizes (odd)"
    )
    final_sinc_omega: Range = Field((math.pi / 3, math.pi), description="final sinc cutoff range (rad)")
    final_resize_modes: tuple[ResizeMode, ...] = Field(
        ("area", "bilinear", "bicubic"), description="modes of the resize to the LR size, drawn uniformly"
    )
    final_jpeg_last_prob: float = Field(
        0.5, ge=0, le=1, description="probability that the last JPEG comes after (not before) resize + sinc"
    )
    usm: USMConfig = Field(USMConfig(), description="unsharp-mask settings")
    usm_sharpen_input: bool = Field(True, description="degrade the USM-sharpened HR (as Real-ESRGAN does)")
    usm_sharpen_hr: bool = Field(
        True, description="return the USM-sharpened HR as target (Real-ESRGAN's L1/perceptual target)"
    )

    @model_validator(mode="after")
    def _validate(self) -> DegradationConfig:
        if not self.final_sinc_sizes or any(k < 1 or k % 2 == 0 for k in self.final_sinc_sizes):
            raise ValueError(f"final_sinc_sizes must be odd sizes, got {self.final_sinc_sizes}")
        if not self.final_resize_modes:
            raise ValueError("final_resize_modes must not be empty; use e.g. ('bicubic',)")
        _check_range("final_sinc_omega", self.final_sinc_omega, 0, math.pi)
        return self


def min_hr_side(cfg: DegradationConfig) -> int:
    """The smallest HR side (a multiple of cfg.scale) for which every reflect-padded filter of the chain fits
    the image at its worst-case intermediate size."""
    h = cfg.scale
    while not _fits(cfg, h):
        h += cfg.scale
    return h


def _fits(cfg: DegradationConfig, h: int) -> bool:
    if (cfg.usm_sharpen_input or cfg.usm_sharpen_hr) and h <= cfg.usm.radius // 2:
        return False
    cur = h
    for rc in (cfg.first, cfg.second):
        if rc.blur_prob > 0 and cur <= max(rc.kernel_sizes) // 2:
            return False
        low = rc.resize_range[0] if rc.resize_probs.get("down", 0) > 0 else 1.0
        cur = math.floor(cur * low) if rc.resize_reference == "input" else int(h / cfg.scale * low)
        if cur < 1:
            return False
    return not (cfg.final_sinc_prob > 0 and h // cfg.scale <= max(cfg.final_sinc_sizes) // 2)
