"""Throughput of dp2o.degrade vs BasicSR's Real-ESRGAN synthesis: 512 px HR crops → 128 px LR per second.

Baseline, measured in the same run on the same crops: RealESRGANDataset's kernel sampling plus
RealESRGANModel.feed_data (USM, two rounds, final sinc/JPEG), batched as in training. Ours: sample_params plus
degrade_batch. CPU runs use ONE thread (torch.set_num_threads(1)). With CUDA, both also run on the GPU, and
our CPU and GPU outputs for the same parameters are compared (they agree up to float rounding, which JPEG
quantisation can turn into a few differing levels). Also writes a profile of where our time goes.

    PYTHONPATH=/path/to/basicsr-target python -m benchmarks.degrade_speed [--n 24] [--device cpu,cuda]

Without basicsr, ours is still measured and the baseline is reported as skipped.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.degrade_reference import SKIP_MESSAGE, BasicSRChain, crops, import_basicsr
from dp2o.degrade import DegradationConfig, degrade_batch, sample_params
from dp2o.seeding import derive_seed

#: the functions whose cumulative time the profile reports (ours)
PROFILED = (
    "usm_sharpen",
    "blur",
    "filter2d",
    "resize",
    "add_gaussian_noise",
    "add_poisson_noise",
    "jpeg",
    "kernel_array",
    "sample_params",
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_crops(n: int, size: int, seed: int) -> torch.Tensor:
    """Photo-like uint8 crops [n, 3, size, size] (smooth gradients, edges, texture) when no photos are at hand."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        f = torch.rand(3, 3, generator=g) * 20
        img = torch.stack([torch.sin(f[c, 0] * xx + f[c, 1] * yy + f[c, 2]) for c in range(3)]) * 0.35 + 0.5
        img += (
            torch.randn(3, size // 8, size // 8, generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
            * 0.05
        )
        out.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(out)


def time_ours(
    hr: torch.Tensor, cfg: DegradationConfig, batch: int, device: str
) -> tuple[float, torch.Tensor]:
    """Seconds for all of hr (params sampled inside the timing) and the LR it produced."""
    degrade_batch(hr[:1], [sample_params(cfg, 0)], cfg, device)  # warm-up
    _sync(device)
    t = time.perf_counter()
    lrs = []
    for start in range(0, len(hr), batch):
        chunk = hr[start : start + batch]
        params = [sample_params(cfg, derive_seed(0, "speed", start + i)) for i in range(len(chunk))]
        lrs.append(degrade_batch(chunk, params, cfg, device)[1])
    _sync(device)
    return time.perf_counter() - t, torch.cat(lrs)


def time_basicsr(bs, hr: torch.Tensor, batch: int, device: str) -> dict:
    chain = BasicSRChain(bs, hr.shape[-1], device)
    chain(hr[:batch], seed=0)  # warm-up
    kernel_s = feed_s = 0.0
    for start in range(0, len(hr), batch):
        chunk = hr[start : start + batch]
        t = time.perf_counter()
        kernels = chain.kernels(len(chunk))
        t1 = time.perf_counter()
        gt = chunk.to(device).float().div(255)
        chain.degrade(gt, {k: v.to(device) for k, v in kernels.items()})
        _sync(device)
        t2 = time.perf_counter()
        kernel_s += t1 - t
        feed_s += t2 - t1
    return {"kernel_sampling_s": kernel_s, "feed_data_s": feed_s, "total_s": kernel_s + feed_s}


def profile_ours(hr: torch.Tensor, cfg: DegradationConfig, device: str) -> dict[str, float]:
    """Cumulative seconds per pipeline function over hr, plus the total."""
    prof = cProfile.Profile()
    params = [sample_params(cfg, derive_seed(0, "speed", i)) for i in range(len(hr))]
    prof.enable()
    for i in range(len(hr)):
        degrade_batch(hr[i : i + 1], params[i : i + 1], cfg, device)
    _sync(device)
    prof.disable()
    st = pstats.Stats(prof)
    out: dict[str, float] = {}
    for (filename, _, name), (_, _, _, cumtime, _) in st.stats.items():
        if "dp2o" in filename and name in PROFILED:
            out[name] = out.get(name, 0.0) + cumtime
    out["total"] = sum(v[3] for k, v in st.stats.items() if k[2] == "degrade_batch")
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=24, help="number of HR crops")
    parser.add_argument("--crop", type=int, default=512, help="HR crop size")
    parser.add_argument(
        "--batch", type=int, default=8, help="batch size (BasicSR's chain shares resize draws per batch)"
    )
    parser.add_argument(
        "--device", default="cpu,cuda", help="comma-separated devices; cuda is skipped if absent"
    )
    parser.add_argument("--source", default="bundled://all", help="HR photos to crop, or 'synthetic'")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "degrade_speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = DegradationConfig()
    hr = (
        synthetic_crops(args.n, args.crop, 0)
        if args.source == "synthetic"
        else crops(args.n, args.crop, 0, args.source)
    )
    bs = import_basicsr()
    result: dict = {
        "task": f"{args.crop}px HR -> {args.crop // cfg.scale}px LR, Real-ESRGAN x4 defaults",
        "baseline": f"basicsr {bs.version} RealESRGANDataset kernels + RealESRGANModel.feed_data"
        if bs
        else SKIP_MESSAGE,
        "n": args.n,
        "batch": args.batch,
        "source": args.source,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_threads": 1,
        "devices": {},
    }
    lr_by_device = {}
    for device in args.device.split(","):
        if device.startswith("cuda") and not torch.cuda.is_available():
            result["devices"][device] = "skipped: CUDA not available"
            continue
        entry: dict = {}
        if device.startswith("cuda"):
            entry["gpu"] = torch.cuda.get_device_name(0)
        ours_s, lr_by_device[device] = time_ours(hr, cfg, args.batch, device)
        entry["ours_s"] = ours_s
        entry["ours_images_per_s"] = args.n / ours_s
        if bs is not None:
            base = time_basicsr(bs, hr, args.batch, device)
            entry["basicsr"] = base
            entry["basicsr_images_per_s"] = args.n / base["total_s"]
            entry["speedup_vs_basicsr"] = base["total_s"] / ours_s
            entry["speedup_vs_basicsr_feed_data_only"] = base["feed_data_s"] / ours_s
        entry["profile_ours_s"] = profile_ours(hr[: min(8, args.n)], cfg, device)
        result["devices"][device] = entry
        print(device, json.dumps(entry, indent=1), flush=True)
    if "cpu" in lr_by_device and any(d.startswith("cuda") for d in lr_by_device):
        gpu = next(d for d in lr_by_device if d.startswith("cuda"))
        diff = (lr_by_device["cpu"].int() - lr_by_device[gpu].int()).abs().float()
        per_image = diff.flatten(1).mean(1)
        result["cpu_vs_gpu"] = {
            "mean_abs_levels": float(diff.mean()),
            "max_abs_levels": float(diff.max()),
            "frac_pixels_differing": float((diff > 0).float().mean()),
            "frac_images_identical": float((diff.flatten(1).max(1).values == 0).float().mean()),
            "worst_image_mean_abs_levels": float(per_image.max()),
            "psnr_db": float(10 * np.log10(255**2 / max(float((diff**2).mean()), 1e-12))),
        }
        print("cpu vs gpu", json.dumps(result["cpu_vs_gpu"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
