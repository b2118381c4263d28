"""CUDA checks of the built-in pieces: tiny-model sampling (CPU vs GPU, batch vs alone), a DPO step, throughput.

    python -m benchmarks.gpu_pipeline_check --out benchmarks/results/gpu_pipeline_check.json

Needs only torch, diffusers, safetensors, pydantic, numpy, pyarrow (no pyiqa/prefect), so it runs on a bare GPU
machine with diffusers carried as a wheel. Baseline for throughput: the same model on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch


def _timeit(fn, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/gpu_pipeline_check.json", help="JSON result path")
    ap.add_argument("--hr", type=int, default=128, help="HR side in pixels")
    ap.add_argument("--batch", type=int, default=64, help="rows per sampling batch on the GPU")
    args = ap.parse_args()

    from dp2o.models.tiny import TinyBackend, bundled_weights_dir
    from dp2o.train.loop import share_noise
    from dp2o.train.losses import dpo_loss

    res: dict = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        Path(args.out).write_text(json.dumps(res, indent=2))
        return 0
    res["device"] = torch.cuda.get_device_name(0)
    weights = bundled_weights_dir()
    cpu = TinyBackend.from_pretrained(weights, "cpu")
    gpu = TinyBackend.from_pretrained(weights, "cuda")
    steps = cpu.num_inference_steps
    lr_side = args.hr // 4
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(8, 3, lr_side, lr_side, generator=g)
    seeds = list(range(100, 108))

    # 1. same seeds on CPU and GPU; one row regenerated alone on GPU
    out_cpu = cpu.sample(lr, seeds)
    out_gpu = gpu.sample(lr, seeds)
    alone = gpu.sample(lr[3:4], seeds[3:4])
    res["cpu_vs_gpu_max_abs"] = float((out_cpu - out_gpu).abs().max())
    res["cpu_vs_gpu_mean_abs_uint8"] = float((out_cpu - out_gpu).abs().mean() * 255)
    res["gpu_alone_vs_batch_max_abs"] = float((alone[0] - out_gpu[3]).abs().max())

    # 2. one DPO step on the GPU starts at ln 2
    gpu.train()
    gen = torch.Generator().manual_seed(1)
    win, lose = out_cpu[:4], out_cpu[4:]
    batch = share_noise(gpu.make_noised_batch(torch.cat([win, lose]), torch.cat([lr[:4], lr[:4]]), gen), 4)
    err, err_ref = gpu.prediction_errors(batch)
    loss, logs = dpo_loss(err[:4], err_ref[:4], err[4:], err_ref[4:], beta=5000.0)
    loss.backward()
    res["dpo_first_loss"] = float(loss)
    res["dpo_first_loss_minus_ln2"] = float(loss) - math.log(2)
    gpu.eval()

    # 3. throughput: candidates/s at the default step count, GPU batch vs CPU (1 thread... all threads here)
    big_lr = torch.rand(args.batch, 3, lr_side, lr_side, generator=g)
    big_seeds = list(range(args.batch))
    gpu.sample(big_lr[:8], big_seeds[:8])
    t_gpu = _timeit(lambda: gpu.sample(big_lr, big_seeds))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        t_gpu_bf16 = _timeit(lambda: gpu.sample(big_lr, big_seeds))
    t_cpu = _timeit(lambda: cpu.sample(big_lr[:8], big_seeds[:8]), repeat=1)
    res.update(
        hr=args.hr,
        steps=steps,
        gpu_fp32_candidates_per_s=args.batch / t_gpu,
        gpu_bf16_autocast_candidates_per_s=args.batch / t_gpu_bf16,
        cpu_candidates_per_s=8 / t_cpu,
        cpu_threads=torch.get_num_threads(),
        peak_gpu_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    res["gpu_over_cpu"] = res["gpu_fp32_candidates_per_s"] / res["cpu_candidates_per_s"]
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
