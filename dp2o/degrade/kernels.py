"""Blur kernels of the Real-ESRGAN degradation, as pure functions of explicit parameters.

Kernels are computed in float64 NumPy and normalised to sum 1 (the pipeline casts them to float32, as
Real-ESRGAN does). Each kernel keeps its own size: Real-ESRGAN zero-pads every kernel to 21×21, which gives
the same blur (the zero ring multiplies the extra reflect-padded border by 0) at a higher cost.
"""

from __future__ import annotations

import numpy as np
from scipy import special

GAUSSIAN_FAMILY = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_KINDS = (*GAUSSIAN_FAMILY, "sinc")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    half = size // 2
    ax = np.arange(-half, half + 1, dtype=np.float64)
    return np.meshgrid(ax, ax)  # xx varies along columns (x), yy along rows (y)


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """[x y] Σ⁻¹ [x y]ᵀ on the kernel grid, Σ = R diag(σx², σy²) Rᵀ with R the rotation by theta."""
    xx, yy = _grid(size)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    inv = np.linalg.inv(cov)
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def gaussian_family_kernel(
    kind: str, size: int, sigma_x: float, sigma_y: float, theta: float, beta: float | None
) -> np.ndarray:
    """A normalised [size, size] float64 kernel of one of the six Gaussian-family kinds.

    iso/aniso: exp(-q/2); generalized_*: exp(-q^β/2); plateau_*: 1/(1+q^β), q the Mahalanobis quadratic form.
    Isotropic kinds ignore sigma_y and theta (they use sigma_x for both axes).
    """
    if kind not in GAUSSIAN_FAMILY:
        raise ValueError(f"unknown Gaussian-family kernel kind {kind!r}; use one of {GAUSSIAN_FAMILY}")
    if size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {size}")
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    if kind in ("iso", "aniso"):
        k = np.exp(-0.5 * q)
    elif kind.startswith("generalized"):
        k = np.exp(-0.5 * np.power(q, beta))
    else:
        k = 1.0 / (np.power(q, beta) + 1.0)
    return k / k.sum()


def gaussian_1d(size: int, sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian whose outer product with itself is the `iso` kernel of the same sigma
    (OpenCV's getGaussianKernel for an explicit sigma)."""
    half = size // 2
    x = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def opencv_gaussian_sigma(size: int) -> float:
    """The sigma OpenCV's getGaussianKernel uses when asked for sigma <= 0 (Real-ESRGAN's USM kernel)."""
    return 0.3 * ((size - 1) * 0.5 - 1) + 0.8


def sinc_kernel(size: int, omega: float) -> np.ndarray:
    """A normalised [size, size] circular low-pass (2-D sinc / Airy) kernel with cutoff `omega` (rad/px)."""
    if size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {size}")
    xx, yy = _grid(size)
    r = np.hypot(xx, yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = omega * special.j1(omega * r) / (2 * np.pi * r)
    k[size // 2, size // 2] = omega**2 / (4 * np.pi)  # the limit of the expression at r = 0
    return k / k.sum()
