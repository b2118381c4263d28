"""Deterministic degradation operations on one image at a time, with every parameter explicit.

Images here are float32 tensors [1, 3, H, W] in [0, 1] on any device. Nothing in this module draws a random
number except from a generator it is handed, and the noise generators are always CPU generators: the noise
field is drawn on the CPU and moved to the image's device, so CPU and GPU runs of the same sample add the
same noise (a CUDA generator with the same seed would draw different numbers).

JPEG follows Real-ESRGAN's training-time compressor, BasicSR's `DiffJPEG(differentiable=False)`: float
YCbCr, 4:2:0 chroma by 2×2 averaging, 8×8 float DCT, quantisation by the standard tables scaled by a
continuous quality factor (not rounded or clipped to integers as libjpeg does), exact rounding, zero padding
to a multiple of 16 and nearest-neighbour chroma upsampling. Its tables are the standard ones transposed;
we keep that, since the aim is the distribution Real-ESRGAN trains on.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special

# Standard JPEG quantisation tables (ITU-T T.81 Annex K), row = vertical frequency.
_LUMA_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float32,
)
_CHROMA_TABLE = np.full((8, 8), 99, dtype=np.float32)
_CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

_RGB_TO_YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32
)
_YCC_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], dtype=np.float32)


def _dct_matrix() -> np.ndarray:
    """Orthonormal 8-point DCT-II matrix C: coefficients = C @ block @ Cᵀ."""
    u = np.arange(8)[:, None]
    x = np.arange(8)[None, :]
    c = np.cos((2 * x + 1) * u * np.pi / 16) * 0.5
    c[0] *= 1 / math.sqrt(2)
    return c.astype(np.float32)


_DCT = _dct_matrix()


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel of img [1, C, H, W] with kernel [k, k] (odd k, k//2 < H, W), reflect padding,
    as BasicSR's filter2D; same shape.

    Computed with FFTs: on a CPU core that is 4-9x faster than a direct convolution for the 7-51 tap kernels
    of this chain, and equal to it up to float32 rounding (~1e-6). The circular convolution of the padded
    image has no wrap-around in the valid window that is kept.
    """
    k = kernel.shape[-1]
    _, c, h, w = img.shape
    x = F.pad(img.reshape(c, 1, h, w), (k // 2,) * 4, mode="reflect").reshape(c, h + k - 1, w + k - 1)
    size = x.shape[-2:]
    flipped = torch.flip(kernel.to(img), (0, 1))
    spectrum = torch.fft.rfft2(x) * torch.fft.rfft2(flipped, s=size)
    return torch.fft.irfft2(spectrum, s=size)[:, k - 1 :, k - 1 :].reshape(1, c, h, w)


def resize(img: torch.Tensor, mode: str, *, scale: float | None = None, size: tuple[int, int] | None = None):
    """Resize img [1, C, H, W] with torch's interpolate (no antialiasing), by `scale` or to `size`.

    Exactly one of scale/size; a scale is passed to interpolate as is (not turned into a size first),
    because bilinear/bicubic sample positions depend on which of the two is given.
    """
    if (scale is None) == (size is None):
        raise ValueError("pass exactly one of scale= or size=")
    if scale is not None:
        return F.interpolate(img, scale_factor=scale, mode=mode)
    return F.interpolate(img, size=size, mode=mode)


def add_gaussian_noise(
    img: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator
) -> torch.Tensor:
    """img [1, 3, H, W] in [0, 1] plus N(0, (sigma/255)²) noise, one field for all channels if gray; clipped."""
    _, c, h, w = img.shape
    noise = torch.randn((1, 1 if gray else c, h, w), generator=generator, dtype=torch.float32)
    return (img + (noise * (sigma / 255.0)).to(img.device)).clamp_(0, 1)


_GUIDE = 256  # guide-table entries per rate: the inverse-CDF search then mostly starts 0 or 1 step short


@functools.lru_cache(maxsize=16)
def _poisson_tables(levels: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For the 256 rates λ_v = levels·v/255 (v = 0..255): the Poisson CDFs, flattened [256·K] (float64), and a
    guide table [256, G] of flat indices where the inverse-CDF search for u ∈ [j/G, (j+1)/G) can start."""
    k_max = int(levels + 12 * math.sqrt(levels) + 24)  # the tail beyond holds < 1e-20 of the mass
    rates = np.arange(256, dtype=np.float64)[:, None] * (levels / 255.0)
    cdf = special.pdtr(np.arange(k_max, dtype=np.float64)[None, :], rates)
    cdf[:, -1] = 1.0
    starts = np.stack([np.searchsorted(row, np.arange(_GUIDE) / _GUIDE) for row in cdf])
    flat_starts = starts + np.arange(256)[:, None] * k_max
    return torch.from_numpy(cdf).flatten(), torch.from_numpy(flat_starts).flatten(), k_max


def _poisson_on_levels(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shot noise for x [1, C, H, W] in [0, 1]: x is quantised to 8 bits, the photon count per level is the
    number of distinct levels rounded up to a power of two (as BasicSR), and the noise is returned.

    Counts are drawn by inverse CDF from exactly one uniform per pixel, not with torch.poisson: its rejection
    sampler uses a varying number of uniforms per pixel, so one rate that differs in the last float bit
    (CPU vs GPU) would shift the random stream for every later pixel. Here it can change only that pixel.
    """
    x8 = (x * 255.0).round_().clamp_(0, 255)
    v = x8.to(device="cpu", dtype=torch.uint8).flatten().long()
    distinct = int((torch.bincount(v, minlength=256) > 0).sum())
    levels = 2 ** math.ceil(math.log2(distinct))
    cdf, guide, k_max = _poisson_tables(levels)
    u = torch.rand(v.shape, generator=generator, dtype=torch.float64)
    idx = guide[v * _GUIDE + (u * _GUIDE).long()]
    for _ in range(2):
        idx += cdf[idx] < u
    rest = (cdf[idx] < u).nonzero().squeeze(1)
    if rest.numel():  # a few pixels (mostly u < 1/G at high rates) are further off: binary-search them
        lo, hi, ur = idx[rest], v[rest] * k_max + (k_max - 1), u[rest]
        while bool((lo < hi).any()):
            mid = (lo + hi) // 2
            right = cdf[mid] < ur
            lo, hi = torch.where(right, mid + 1, lo), torch.where(right, hi, mid)
        idx[rest] = lo
    counts = idx - v * k_max
    return (counts.to(torch.float32).reshape(x8.shape) / levels).to(x.device) - x8 / 255.0


def add_poisson_noise(
    img: torch.Tensor, scale: float, gray: bool, generator: torch.Generator
) -> torch.Tensor:
    """img [1, 3, H, W] in [0, 1] plus `scale` × Poisson shot noise (of the luma if gray); clipped to [0, 1]."""
    if gray:
        r, g, b = img[:, 0:1], img[:, 1:2], img[:, 2:3]
        luma = 0.2989 * r + 0.587 * g + 0.114 * b  # torchvision's rgb_to_grayscale weights, as BasicSR
        noise = _poisson_on_levels(luma, generator).expand_as(img)
    else:
        noise = _poisson_on_levels(img, generator)
    return (img + noise * scale).clamp_(0, 1)


def jpeg_quality_factor(quality: float) -> float:
    """The libjpeg quality → table scale mapping, kept continuous (quality 50 → 1.0, 95 → 0.1)."""
    return (5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality) / 100.0


def _blocks(plane: torch.Tensor) -> torch.Tensor:
    h, w = plane.shape
    return plane.reshape(h // 8, 8, w // 8, 8).permute(0, 2, 1, 3)


def _unblocks(blocks: torch.Tensor) -> torch.Tensor:
    nh, nw = blocks.shape[:2]
    return blocks.permute(0, 2, 1, 3).reshape(nh * 8, nw * 8)


def _jpeg_plane(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    coeffs = dct @ (_blocks(plane) - 128.0) @ dct.T
    quantised = torch.round(coeffs / table) * table
    return _unblocks(dct.T @ quantised @ dct) + 128.0


def jpeg(img: torch.Tensor, quality: float) -> torch.Tensor:
    """JPEG-compress and decode img [1, 3, H, W] in [0, 1] at a (continuous) quality in [1, 100]; same shape,
    float32 in [0, 1]. See the module docstring for what is and is not modelled."""
    _, _, h, w = img.shape
    factor = jpeg_quality_factor(quality)
    dev = img.device
    dct = torch.from_numpy(_DCT).to(dev)
    # DiffJPEG's tables are the standard ones transposed; its blocks are indexed [row, column] like ours.
    luma_t = torch.from_numpy(_LUMA_TABLE.T.copy()).to(dev) * factor
    chroma_t = torch.from_numpy(_CHROMA_TABLE.T.copy()).to(dev) * factor
    ph, pw = (-h) % 16, (-w) % 16
    x = F.pad(img, (0, pw, 0, ph)) * 255.0
    ycc = torch.einsum("ij,bjhw->bihw", torch.from_numpy(_RGB_TO_YCC).to(dev), x)
    y = ycc[0, 0]
    cb = F.avg_pool2d(ycc[:, 1:2] + 128.0, 2)[0, 0]
    cr = F.avg_pool2d(ycc[:, 2:3] + 128.0, 2)[0, 0]
    y = _jpeg_plane(y, luma_t, dct)
    cb = _jpeg_plane(cb, chroma_t, dct).repeat_interleave(2, 0).repeat_interleave(2, 1) - 128.0
    cr = _jpeg_plane(cr, chroma_t, dct).repeat_interleave(2, 0).repeat_interleave(2, 1) - 128.0
    rgb = torch.einsum("ij,jhw->ihw", torch.from_numpy(_YCC_TO_RGB).to(dev), torch.stack([y, cb, cr]))
    return (rgb.clamp(0, 255) / 255.0)[None, :, :h, :w]


def usm_sharpen(img: torch.Tensor, kernel: torch.Tensor, weight: float, threshold: float) -> torch.Tensor:
    """Unsharp masking of img [1, 3, H, W] in [0, 1] (H, W > kernel size / 2), as Real-ESRGAN's USMSharp:
    sharpen by `weight` × (img − blur) where the blurred residual mask (|residual| > threshold/255) is on."""
    blur = filter2d(img, kernel)
    residual = img - blur
    mask = (residual.abs() * 255.0 > threshold).float()
    soft = filter2d(mask, kernel)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * img
