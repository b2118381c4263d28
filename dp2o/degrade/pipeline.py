"""The degradation chain: HR uint8 images + sampled parameters → (HR target, LR), on CPU or GPU.

The chain is Real-ESRGAN's: optional unsharp masking of the HR, then rounds of blur → resize → noise → JPEG
(the second with a probability), then resize to the LR size and the final sinc filter, before or after the
last round's JPEG. Samples are processed one at a time on purpose: every sample has its own kernel and its
own intermediate sizes, and a batched convolution may pick a different algorithm (and rounding) per batch
size, so per-sample ops are what makes a sample's LR byte-identical whatever batch it is in. The work per
sample is large enough (≥ 512² pixels) that the loop costs little. Filters run as FFT products
(`ops.filter2d`), the main reason this is several times faster than BasicSR on a CPU core.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dp2o.degrade import ops
from dp2o.degrade.config import DegradationConfig, RoundConfig, min_hr_side
from dp2o.degrade.kernels import gaussian_1d, gaussian_family_kernel, opencv_gaussian_sigma, sinc_kernel
from dp2o.degrade.params import DegradationParams, KernelParams, RoundParams, validate_params
from dp2o.seeding import torch_generator


def kernel_array(k: KernelParams) -> np.ndarray:
    """The [size, size] float64 kernel described by `k`."""
    if k.kind == "sinc":
        return sinc_kernel(k.size, k.omega)
    return gaussian_family_kernel(k.kind, k.size, k.sigma_x, k.sigma_y, k.theta, k.beta)


def blur(img: torch.Tensor, k: KernelParams) -> torch.Tensor:
    """Blur img [1, 3, H, W] float32 in [0, 1] with kernel `k` (reflect padding); same shape."""
    return ops.filter2d(img, torch.from_numpy(kernel_array(k).astype(np.float32)))


def usm_kernel(cfg: DegradationConfig) -> torch.Tensor:
    """The [radius, radius] float32 Gaussian of Real-ESRGAN's USMSharp (OpenCV's default sigma for the size)."""
    g = gaussian_1d(cfg.usm.radius, opencv_gaussian_sigma(cfg.usm.radius))
    return torch.from_numpy(np.outer(g, g).astype(np.float32))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


def _round(
    out: torch.Tensor, rc: RoundConfig, rp: RoundParams, lr_size: tuple[float, float], jpeg: bool
) -> torch.Tensor:
    if rp.blur is not None:
        out = blur(out, rp.blur)
    if rc.resize_reference == "input":
        out = ops.resize(out, rp.resize_mode, scale=rp.resize_scale)
    else:
        size = (int(lr_size[0] * rp.resize_scale), int(lr_size[1] * rp.resize_scale))
        out = ops.resize(out, rp.resize_mode, size=size)
    gen = torch_generator(rp.noise_seed)
    if rp.noise == "gaussian":
        out = ops.add_gaussian_noise(out, rp.noise_sigma, rp.noise_gray, gen)
    else:
        out = ops.add_poisson_noise(out, rp.poisson_scale, rp.noise_gray, gen)
    return ops.jpeg(out, rp.jpeg_quality) if jpeg else out


def degrade_one(
    hr: torch.Tensor, p: DegradationParams, cfg: DegradationConfig, usm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample: hr uint8 [1, 3, H, W] on the target device → (HR target, LR) uint8 on that device."""
    h, w = hr.shape[-2:]
    x = hr.float() / 255.0
    sharp = None
    if cfg.usm_sharpen_input or cfg.usm_sharpen_hr:
        sharp = ops.usm_sharpen(x, usm, cfg.usm.weight, cfg.usm.threshold)
    target = _to_uint8(sharp) if cfg.usm_sharpen_hr else hr
    out = sharp if cfg.usm_sharpen_input else x
    # Real-ESRGAN sizes the second round from the *unrounded* LR size H/scale (int() only after scaling).
    lr_float = (h / cfg.scale, w / cfg.scale)
    rounds = [(cfg.first, p.first)] + ([(cfg.second, p.second)] if p.second is not None else [])
    for i, (rc, rp) in enumerate(rounds):
        out = _round(out, rc, rp, lr_float, jpeg=i < len(rounds) - 1)
    last_quality = rounds[-1][1].jpeg_quality
    lr_size = (h // cfg.scale, w // cfg.scale)
    if not p.final_jpeg_last:
        out = ops.jpeg(out, last_quality)
    out = ops.resize(out, p.final_resize_mode, size=lr_size)
    if p.final_sinc is not None:
        out = blur(out, p.final_sinc)
    if p.final_jpeg_last:
        out = ops.jpeg(out.clamp(0, 1), last_quality)
    return target, _to_uint8(out)


def degrade_batch(
    hr: torch.Tensor,
    params: Sequence[DegradationParams],
    cfg: DegradationConfig,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade a batch of HR crops.

    hr: uint8 [B, 3, H, W] RGB in [0, 255], H and W multiples of cfg.scale and at least `min_hr_side(cfg)`.
    params: one `DegradationParams` per row. Returns (HR target uint8 [B, 3, H, W], LR uint8
    [B, 3, H/scale, W/scale]) on the CPU. Row i depends only on (hr[i], params[i]).
    """
    if hr.dtype != torch.uint8 or hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"hr must be a uint8 tensor [B, 3, H, W], got {hr.dtype} {tuple(hr.shape)}")
    if len(params) != hr.shape[0]:
        raise ValueError(f"got {len(params)} parameter sets for a batch of {hr.shape[0]} images")
    h, w = hr.shape[-2:]
    if h % cfg.scale or w % cfg.scale:
        raise ValueError(
            f"HR size {h}x{w} is not a multiple of scale={cfg.scale}; crop it to a multiple first"
        )
    smallest = min_hr_side(cfg)
    if min(h, w) < smallest:
        raise ValueError(f"HR size {h}x{w} is too small for this config: both sides must be >= {smallest}")
    for p in params:
        validate_params(p)
    dev = torch.device(device)
    usm = usm_kernel(cfg)
    targets, lrs = [], []
    with torch.no_grad():
        for i, p in enumerate(params):
            target, lr = degrade_one(hr[i : i + 1].to(dev), p, cfg, usm)
            targets.append(target.cpu())
            lrs.append(lr.cpu())
    return torch.cat(targets), torch.cat(lrs)
