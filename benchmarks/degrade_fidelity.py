"""Fidelity of dp2o.degrade against BasicSR 1.4.2 (Real-ESRGAN's degradation code).

Part 1, op by op with identical explicit parameters: kernels, blur, resize, Gaussian noise (same seeds),
Poisson noise (same rates; distribution, since we draw counts by inverse CDF), DiffJPEG, USM, and the whole
chain (our `degrade_batch` vs BasicSR's ops composed in Real-ESRGAN's order with our parameters and noise
fields, on samples with Gaussian noise). Part 2, distributions: N crops degraded by our sampler + chain and by the
genuine BasicSR path (RealESRGANDataset kernels + RealESRGANModel.feed_data, its own RNG); LR statistics
(PSNR of the bicubic-upsampled LR vs the HR, estimated noise sigma, Laplacian-variance sharpness) compared
with two-sample KS tests. Writes benchmarks/results/degrade_fidelity.json.

    PYTHONPATH=/path/to/basicsr-target python -m benchmarks.degrade_fidelity [--n 500] [--crop 256]

Exits 0 with a message (and writes nothing) when basicsr is not importable.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from benchmarks.degrade_reference import (
    SKIP_MESSAGE,
    BasicSRChain,
    basicsr_chain_with_params,
    basicsr_kernel,
    crops,
    import_basicsr,
)
from dp2o.degrade import DegradationConfig, degrade_batch, ops, sample_params  # noqa: E402
from dp2o.degrade.pipeline import blur, kernel_array, usm_kernel  # noqa: E402
from dp2o.seeding import derive_seed, torch_generator  # noqa: E402

#: tolerances asserted by part 1 (floats in [0, 1] unless stated)
TOLERANCES = {
    "kernel_max_abs": 1e-12,
    "blur_max_abs": 1e-5,
    "resize_max_abs": 0.0,
    "gaussian_noise_max_abs": 1e-6,
    "poisson_colour_std_ratio_minus_1": 0.02,
    "poisson_gray_std_ratio_minus_1": 0.02,
    "usm_max_abs": 1e-5,
    "jpeg_mean_abs_levels": 0.05,
    "jpeg_frac_pixels_off_by_more_than_1_level": 0.001,
    "chain_frac_identical_lr": 0.7,
    "chain_mean_abs_levels": 0.05,
}


@torch.no_grad()
def op_by_op(bs, cfg: DegradationConfig, hr: torch.Tensor, n_chain: int) -> dict:
    res: dict = {}
    params = [sample_params(cfg, derive_seed(1, "fidelity", i)) for i in range(max(4 * n_chain, 200))]
    kernels = [
        k for p in params for k in (p.first.blur, p.second.blur if p.second else None, p.final_sinc) if k
    ]
    res["kernel_max_abs"] = max(
        float(np.abs(kernel_array(k) - basicsr_kernel(bs, k, k.size)).max()) for k in kernels
    )
    res["kernel_count"] = len(kernels)
    img = hr[:1].float() / 255
    res["blur_max_abs"] = max(
        float((blur(img, k) - bs.filter2D(img, torch.FloatTensor(basicsr_kernel(bs, k))[None])).abs().max())
        for k in kernels[:60]
    )
    worst = 0.0
    for scale, mode in [(0.37, "area"), (1.3, "bilinear"), (0.61, "bicubic"), (1.0, "bicubic")]:
        worst = max(
            worst,
            float(
                (ops.resize(img, mode, scale=scale) - F.interpolate(img, scale_factor=scale, mode=mode))
                .abs()
                .max()
            ),
        )
    res["resize_max_abs"] = worst
    worst = 0.0
    d = bs.degradations
    for seed, gray in [(3, False), (4, True)]:
        torch.manual_seed(seed)
        ref = d.add_gaussian_noise_pt(img, sigma=17.0, gray_noise=float(gray), clip=True, rounds=False)
        worst = max(
            worst, float((ops.add_gaussian_noise(img, 17.0, gray, torch_generator(seed)) - ref).abs().max())
        )
    res["gaussian_noise_max_abs"] = worst
    # Poisson counts are drawn by inverse CDF (one uniform per pixel), torch.poisson by rejection: the same
    # seed gives different fields, so compare the noise distributions on a ramp of every 8-bit level.
    ramp = torch.linspace(0, 1, 256).repeat(1, 3, 256, 1)
    for gray in (False, True):
        torch.manual_seed(5)
        ref = d.add_poisson_noise_pt(ramp, scale=1.7, gray_noise=float(gray), clip=True, rounds=False) - ramp
        ours = ops.add_poisson_noise(ramp, 1.7, gray, torch_generator(5)) - ramp
        ks = stats.ks_2samp(ours.flatten().numpy(), ref.flatten().numpy())
        std_ratio = float(ours.std() / ref.std())
        key = "gray" if gray else "colour"
        res[f"poisson_{key}_ks_p_value"] = float(ks.pvalue)
        res[f"poisson_{key}_std_ratio_minus_1"] = abs(std_ratio - 1)
    usm_ref = bs.USMSharp(radius=cfg.usm.radius)(img, weight=cfg.usm.weight, threshold=cfg.usm.threshold)
    g = usm_kernel(cfg)
    res["usm_max_abs"] = float(
        (ops.usm_sharpen(img, g, cfg.usm.weight, cfg.usm.threshold) - usm_ref).abs().max()
    )
    jpeger = bs.DiffJPEG(differentiable=False)
    diffs = []
    for q, (h, w) in zip(
        [30, 37.5, 50, 63.2, 75, 90, 95],
        [(96, 96), (77, 130), (128, 128), (93, 61), (128, 100), (50, 50), (128, 128)],
        strict=True,
    ):
        x = img[..., :h, :w].contiguous()
        diffs.append((ops.jpeg(x, q) - jpeger(x, quality=torch.tensor([float(q)]))).abs().flatten() * 255)
    diffs = torch.cat(diffs)
    res["jpeg_mean_abs_levels"] = float(diffs.mean())
    res["jpeg_max_abs_levels"] = float(diffs.max())
    res["jpeg_frac_pixels_off_by_more_than_1_level"] = float((diffs > 1).float().mean())
    # Same parameters and the same Gaussian noise fields: samples whose rounds both use Gaussian noise.
    gaussian = [
        p
        for p in params
        if p.first.noise == "gaussian" and (p.second is None or p.second.noise == "gaussian")
    ]
    identical, mad, mx = 0, [], 0
    for i, p in enumerate(gaussian[:n_chain]):
        x = hr[i % len(hr) : i % len(hr) + 1]
        _, lr = degrade_batch(x, [p], cfg)
        _, ref = basicsr_chain_with_params(bs, x, p, cfg)
        diff = (lr.int() - ref.int()).abs()
        identical += int(diff.max() == 0)
        mad.append(float(diff.float().mean()))
        mx = max(mx, int(diff.max()))
    res["chain_samples"] = len(mad)
    res["chain_frac_identical_lr"] = identical / len(mad)
    res["chain_mean_abs_levels"] = float(np.mean(mad))
    res["chain_max_abs_levels"] = mx
    return res


def noise_sigma(gray: torch.Tensor) -> float:
    """Immerkær's fast noise estimate (1996) of a gray image [h, w] in 8-bit levels: the mean absolute
    response to a Laplacian-difference mask that cancels locally linear structure."""
    mask = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]).reshape(1, 1, 3, 3)
    response = F.conv2d(gray[None, None], mask).abs()
    return float(np.sqrt(np.pi / 2) * response.mean() / 6)


def lr_stats(hr: torch.Tensor, lr: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample statistics of uint8 LR [N, 3, h, w] against uint8 HR [N, 3, H, W]."""
    psnr, sigma, sharp = [], [], []
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).reshape(1, 1, 3, 3)
    for h, low in zip(hr.float() / 255, lr.float() / 255, strict=True):
        up = F.interpolate(low[None], size=h.shape[-2:], mode="bicubic").clamp(0, 1)[0]
        psnr.append(float(-10 * torch.log10(((up - h) ** 2).mean())))
        gray = (0.299 * low[0] + 0.587 * low[1] + 0.114 * low[2]) * 255
        sigma.append(noise_sigma(gray))
        sharp.append(float(F.conv2d(gray[None, None], lap).var()))
    return {
        "psnr_bicubic_db": np.array(psnr),
        "noise_sigma_levels": np.array(sigma),
        "laplacian_var": np.array(sharp),
    }


def distributions(bs, cfg: DegradationConfig, hr: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    ours = torch.cat(
        [
            degrade_batch(hr[i : i + 1], [sample_params(cfg, derive_seed(2, "fidelity", i))], cfg)[1]
            for i in range(len(hr))
        ]
    )
    t1 = time.perf_counter()
    chain = BasicSRChain(bs, hr.shape[-1])
    theirs = torch.cat([chain(hr[i : i + 1], seed=i) for i in range(len(hr))])
    t2 = time.perf_counter()
    a, b = lr_stats(hr, ours), lr_stats(hr, theirs)
    out = {"n": len(hr), "seconds_ours": t1 - t0, "seconds_basicsr": t2 - t1, "stats": {}}
    for key in a:
        ks = stats.ks_2samp(a[key], b[key])
        out["stats"][key] = {
            "ks_statistic": float(ks.statistic),
            "p_value": float(ks.pvalue),
            "ours_mean": float(a[key].mean()),
            "basicsr_mean": float(b[key].mean()),
            "ours_quartiles": [float(q) for q in np.percentile(a[key], [25, 50, 75])],
            "basicsr_quartiles": [float(q) for q in np.percentile(b[key], [25, 50, 75])],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=500, help="crops for the distribution comparison")
    parser.add_argument("--crop", type=int, default=256, help="HR crop size (Real-ESRGAN trains on 256)")
    parser.add_argument(
        "--chain-samples", type=int, default=100, help="samples for the identical-params chain"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "degrade_fidelity.json"))
    args = parser.parse_args(argv)
    bs = import_basicsr()
    if bs is None:
        print(f"skipped: {SKIP_MESSAGE}")
        return 0
    torch.set_num_threads(args.threads)
    cfg = DegradationConfig()
    hr = crops(args.n, args.crop, seed=0)
    result = {
        "baseline": f"basicsr {bs.version}",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": args.threads,
        "crop": args.crop,
        "tolerances": TOLERANCES,
    }
    result["op_by_op"] = op_by_op(bs, cfg, hr, args.chain_samples)
    ops_res = result["op_by_op"]
    lower_is_better = [k for k in TOLERANCES if not k.startswith("chain_frac")]
    poisson_ok = all(ops_res[f"poisson_{k}_ks_p_value"] > 0.001 for k in ("colour", "gray"))
    result["op_by_op_pass"] = (
        poisson_ok
        and all(ops_res[k] <= TOLERANCES[k] for k in lower_is_better)
        and (ops_res["chain_frac_identical_lr"] >= TOLERANCES["chain_frac_identical_lr"])
    )
    print(json.dumps(result["op_by_op"], indent=1), "pass:", result["op_by_op_pass"], flush=True)
    result["distributions"] = distributions(bs, cfg, hr)
    print(json.dumps(result["distributions"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
