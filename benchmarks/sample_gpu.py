"""GPU sampling throughput of the C-SD2 and C-FLUX backends against a plain diffusers-pipeline loop.

Both sides use randomly initialised weights of the real architectures at real sizes (configs inline below:
no downloads), the same GPU and the same run. Baseline ("pipeline_loop"): the diffusers pipeline object called
once per (LR, seed) — one image per call, fp16 for SD2 (bf16 for FLUX, which has no fp16 recipe). Ours: one
`backend.sample` call over n_lr × n_seeds rows in bf16 (default settings; optionally torch.compile). Reported:
candidates/s, seconds per candidate, peak GPU memory, the ratio to the baseline, and achieved denoiser TFLOP/s
(FLOPs of one UNet+ControlNet / transformer+ControlNet forward counted with torch.utils.flop_counter, times
the forwards per candidate, over wall time — VAE and text encoding are in the time but not the FLOPs).

FLUX: by default the real transformer (12B parameters, 19 double + 38 single blocks, ~24 GiB in bf16) with a
real-width 4-block ControlNet, but 1-layer T5/CLIP text encoders: prompt embeddings are cached, so encoder
depth does not enter the sampling time. `--flux-layers/--flux-single-layers` shrink the depth for small GPUs.

  python -m benchmarks.sample_gpu --out benchmarks/results/sample_gpu.json [--compile]
  python -m benchmarks.sample_gpu --quick --out /tmp/sample_gpu_quick.json     # CPU dry run, tiny models

A machine without diffusers can take a `pip install --target DIR` copy of it on PYTHONPATH (run from the
repository root): `PYTHONPATH=$PWD:DIR python3 -m benchmarks.sample_gpu ...`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

SD2_UNET = {  # stabilityai/stable-diffusion-2-base unet/config.json
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
SD2_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
SD2_TEXT = {  # OpenCLIP ViT-H/14 text tower, as shipped with SD2
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SD2_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
FLUX_TRANSFORMER = {  # black-forest-labs/FLUX.1-dev widths; depth set by --flux-layers/--flux-single-layers
    "patch_size": 1,
    "in_channels": 64,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_VAE = {
    **SD2_VAE,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
FLUX_CLIP = {
    **SD2_TEXT,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "projection_dim": 768,
}
FLUX_T5 = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "feed_forward_proj": "gated-gelu"}
FLUX_SCHEDULER = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# --quick: the same classes at test size, for a CPU dry run of every code path
TINY_UNET = {
    **SD2_UNET,
    "sample_size": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}
TINY_VAE = {**SD2_VAE, "block_out_channels": [8, 16], "norm_num_groups": 4, "sample_size": 32}
TINY_VAE["down_block_types"], TINY_VAE["up_block_types"] = (
    ["DownEncoderBlock2D"] * 2,
    ["UpDecoderBlock2D"] * 2,
)
TINY_TEXT = {
    **SD2_TEXT,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 1,
}
TINY_TEXT.update(vocab_size=1000, projection_dim=32)
TINY_FLUX = {**FLUX_TRANSFORMER, "in_channels": 16, "attention_head_dim": 8, "num_attention_heads": 2}
TINY_FLUX.update(joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4])
TINY_FLUX_VAE = {**TINY_VAE, "latent_channels": 4, "scaling_factor": 0.3611, "shift_factor": 0.1159}
TINY_FLUX_VAE.update(use_quant_conv=False, use_post_quant_conv=False)
TINY_T5 = {"d_model": 32, "d_ff": 37, "d_kv": 8, "num_heads": 4, "feed_forward_proj": "gated-gelu"}

NEGATIVE = "dotted, noise, blur, lowres, smooth"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/sample_gpu.json"), help="JSON result path"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny models, tiny images: a CPU dry run of every path"
    )
    p.add_argument("--steps", type=int, help="SD2 sampler steps (default 50; 2 with --quick); FLUX uses half")
    p.add_argument("--n-lr", type=int, default=4, help="distinct LR inputs per batch")
    p.add_argument("--n-seeds", type=int, default=4, help="seeds per LR input (rows = n-lr × n-seeds)")
    p.add_argument("--baseline-images", type=int, default=2, help="timed pipeline calls (one image each)")
    p.add_argument(
        "--compile", action="store_true", help="also time our sampler with torch.compile (+1–2 min)"
    )
    p.add_argument("--skip-flux", action="store_true", help="only C-SD2")
    p.add_argument("--skip-sd2", action="store_true", help="only C-FLUX")
    p.add_argument(
        "--flux-layers", type=int, help="FLUX double-stream blocks (default: the real 19; 1 with --quick)"
    )
    p.add_argument(
        "--flux-single-layers",
        type=int,
        help="FLUX single-stream blocks (default: the real 38; 1 with --quick)",
    )
    p.add_argument(
        "--lr-size", type=int, help="LR side in pixels (default 128 → 512 px output; 8 with --quick)"
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1 if args.quick else min(8, torch.get_num_threads()))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    steps = args.steps or (2 if args.quick else 50)
    lr_size = args.lr_size or (8 if args.quick else 128)
    try:
        import diffusers
    except ImportError as exc:
        # exit code 3 (not 1) lets a wrapper retry with another PYTHONPATH without rerunning failures
        print(
            f"cannot import diffusers ({exc}); put a `pip install --target DIR` of diffusers on PYTHONPATH "
            "(and, if the error names huggingface_hub, a newer huggingface_hub in a folder before it)",
            file=sys.stderr,
        )
        sys.exit(3)

    result = {
        "benchmark": "sample_gpu",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "quick": args.quick,
        "output_px": 4 * lr_size,
        "rows_per_batch": args.n_lr * args.n_seeds,
    }
    started = time.perf_counter()
    sections = (
        []
        if args.skip_sd2
        else [("sd2", lambda out, save: bench_sd2(args, device, steps, lr_size, out, save))]
    )
    if not args.skip_flux:
        flux_steps = max(1, steps // 2)
        sections.append(("flux", lambda out, save: bench_flux(args, device, flux_steps, lr_size, out, save)))
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # rewritten after every measurement, so a run cut short by a time limit still leaves what it measured
        result["total_seconds"] = round(time.perf_counter() - started, 1)
        args.out.write_text(json.dumps(result, indent=2))

    if args.compile and not args.skip_sd2:
        sections.append(
            ("sd2", lambda out, save: bench_sd2_compiled(args, device, steps, lr_size, out, save))
        )
    for name, run in sections:
        result.setdefault(name, {})
        try:  # one failing section (e.g. out of memory) must not lose the other's numbers
            run(result[name], save)
        except Exception as exc:
            traceback.print_exc()
            result[name]["error"] = f"{type(exc).__name__}: {exc}"
        save()
    print(json.dumps(result, indent=2))
    failed = [name for name, _ in sections if "error" in result[name]]
    if failed:
        raise SystemExit(f"sections {failed} failed (see the tracebacks above); the others are in {args.out}")
    return result


# ---- helpers ---------------------------------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def word_tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str, unk: str, max_length: int):
    """A word-level fast tokenizer built in memory with the `tokenizers` library (ids < 64).

    Prompt content does not change sampling cost (prompts are padded to a fixed length), and this builds the
    same way under transformers 4 and 5, which differ in how CLIP/T5 tokenizers take an in-memory vocabulary.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*specials, *"abcdefghijklmnopqrstuvwxyz,", *NEGATIVE.replace(",", "").split()]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}" if bos else f"$A {eos}",
        special_tokens=[(t, vocab[t]) for t in (bos, eos) if t],
    )
    names = {"eos_token": eos, "pad_token": pad, "unk_token": unk, **({"bos_token": bos} if bos else {})}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **names)


def clip_tokenizer():
    # ids as in SD2's CLIP config: bos 0, pad 1, eos 2
    specials = ["<|startoftext|>", "!", "<|endoftext|>"]
    return word_tokenizer(specials, bos=specials[0], eos=specials[2], pad="!", unk=specials[2], max_length=77)


def t5_tokenizer():
    specials = ["<pad>", "</s>", "<unk>"]
    return word_tokenizer(specials, bos=None, eos="</s>", pad="<pad>", unk="<unk>", max_length=512)


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def count_flops(fn) -> float:
    """FLOPs of `fn()`; attention runs as plain matmuls here so every SDPA backend is counted the same way."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def summary(seconds: float, candidates: int, flops_per_candidate: float, device) -> dict:
    return {
        "candidates": candidates,
        "seconds": round(seconds, 3),
        "candidates_per_s": round(candidates / seconds, 3),
        "s_per_candidate": round(seconds / candidates, 4),
        "denoiser_tflops_per_s": round(flops_per_candidate * candidates / seconds / 1e12, 3),
        "peak_gib": peak_gib(device),
    }


def lr_batch(args, lr_size, device):
    import torch

    lr = torch.rand(args.n_lr, 3, lr_size, lr_size, generator=torch.Generator().manual_seed(0))
    rows = lr.repeat_interleave(args.n_seeds, dim=0)
    seeds = [1000 * i + s for i in range(args.n_lr) for s in range(args.n_seeds)]
    return rows, seeds


# ---- C-SD2 -----------------------------------------------------------------------------------------------
def sd2_configs(args) -> tuple[dict, dict, dict]:
    return (TINY_UNET, TINY_VAE, TINY_TEXT) if args.quick else (SD2_UNET, SD2_VAE, SD2_TEXT)


def sd2_components(args, device) -> dict:
    """Randomly initialised SD2-base UNet, ControlNet (from the UNet), VAE and text encoder, on `device`."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = sd2_configs(args)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg).eval()
        embed_channels = (8, 16) if args.quick else (16, 32, 96, 256)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embed_channels)
        vae = AutoencoderKL(**vae_cfg).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg)).eval()
    return {
        "unet": unet,
        "controlnet": controlnet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer(),
    }


def sd2_backend(parts: dict, device, steps: int, dtype: str, **options):
    """Our C-SD2 backend around already-built components (what `from_config` does after loading)."""
    from diffusers import DDPMScheduler

    from dp2o.models.config import BackendConfig
    from dp2o.models.sd2_controlnet import SD2ControlNetBackend

    cfg = BackendConfig(
        kind="sd2-controlnet", device=str(device), dtype=dtype, num_inference_steps=steps, **options
    )
    return SD2ControlNetBackend(**parts, scheduler=DDPMScheduler.from_config(SD2_SCHEDULER), cfg=cfg)


def time_ours(b, rows, seeds, steps: int, flops_per_candidate: float, device) -> tuple[dict, object]:
    """Warm up at the timed batch shape (compiles when `compile` is set), then time one full sample call."""
    b.num_inference_steps = 2
    b.sample(rows, seeds)
    b.num_inference_steps = steps
    reset_peak(device)
    seconds, images = timed(lambda: b.sample(rows, seeds), device)
    return summary(seconds, rows.shape[0], flops_per_candidate, device), images


def bench_sd2(args, device, steps: int, lr_size: int, out: dict, save) -> None:
    import torch
    from diffusers import DDPMScheduler, StableDiffusionControlNetPipeline

    from dp2o.models._hf_common import upsample
    from dp2o.models.sd2_controlnet import DEFAULT_GUIDANCE

    unet_cfg, vae_cfg, text_cfg = sd2_configs(args)
    parts = sd2_components(args, device)
    unet, controlnet, vae, text_encoder, tokenizer = (
        parts[k] for k in ("unet", "controlnet", "vae", "text_encoder", "tokenizer")
    )
    params = {
        n: sum(p.numel() for p in m.parameters()) for n, m in (("unet", unet), ("controlnet", controlnet))
    }
    rows, seeds = lr_batch(args, lr_size, device)
    out.update(steps=steps, guidance=DEFAULT_GUIDANCE, scheduler="DDPM", params=params)

    # half precision only where it is fast: fp16 (baseline) / bf16 (ours) on the GPU, float32 on the CPU
    base_dtype = torch.float16 if device.type == "cuda" else torch.float32
    for m in (unet, controlnet, vae, text_encoder):
        m.to(base_dtype)
    # one row-forward of ControlNet + UNet; a guided step runs it on 2 rows
    latent_px = 4 * lr_size // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    lat = torch.randn(1, 4, latent_px, latent_px, device=device, dtype=base_dtype)
    emb = torch.randn(1, 77, text_cfg["hidden_size"], device=device, dtype=base_dtype)
    cond = torch.rand(1, 3, 4 * lr_size, 4 * lr_size, device=device, dtype=base_dtype)
    t = torch.tensor([500], device=device)

    def row_forward():
        with torch.no_grad():
            d, m = controlnet(lat, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
            unet(
                lat,
                t,
                encoder_hidden_states=emb,
                down_block_additional_residuals=d,
                mid_block_additional_residual=m,
            )

    row_flops = count_flops(row_forward)
    flops_per_candidate = row_flops * 2 * steps
    out["tflop_per_candidate"] = round(flops_per_candidate / 1e12, 3)
    out["gflop_per_row_forward"] = round(row_flops / 1e9, 3)

    # baseline: the diffusers pipeline, one (LR, seed) per call
    pipe = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=DDPMScheduler.from_config(SD2_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def pipe_call(i: int, n_steps: int):
        return pipe(
            prompt="",
            negative_prompt=NEGATIVE,
            image=upsample(rows[i : i + 1], 4).to(device, base_dtype),
            num_inference_steps=n_steps,
            guidance_scale=DEFAULT_GUIDANCE,
            generator=torch.Generator(device).manual_seed(seeds[i]),
            output_type="pt",
        ).images

    pipe_call(0, 2)  # warm-up: kernels, cudnn autotuning
    reset_peak(device)
    n = min(args.baseline_images, rows.shape[0])
    seconds, _ = timed(lambda: [pipe_call(i, steps) for i in range(n)], device)
    out["pipeline_loop"] = {"dtype": str(base_dtype), **summary(seconds, n, flops_per_candidate, device)}
    save()

    # ours: every row in one batched loop, bf16, default backend settings
    ours_dtype = "bfloat16" if device.type == "cuda" else "float32"
    for m in (unet, controlnet, vae, text_encoder):
        m.to(getattr(torch, ours_dtype))

    def backend(**options):
        return sd2_backend(parts, device, steps, ours_dtype, **options)

    def run_ours(b):
        return time_ours(b, rows, seeds, steps, flops_per_candidate, device)

    b = backend()
    out["ours"], images = run_ours(b)
    out["ours"]["dtype"] = ours_dtype
    out["ours"]["memory_format"] = "channels_last" if device.type == "cuda" else "contiguous"
    score(out)
    save()
    # a candidate regenerated alone must match its batched twin (bf16 tolerance on GPU)
    k = rows.shape[0] - 1
    alone = b.sample(rows[k : k + 1], seeds[k : k + 1])
    out["regenerated_alone_max_abs_diff"] = round(float((alone - images[k : k + 1]).abs().max()), 5)
    out["batch_sweep"] = batch_sweep(b, lr_size, steps, (1, 2, 4) if args.quick else (4, 16, 32), device)
    save()
    if device.type == "cuda":
        # same backend with NCHW-contiguous modules: shows what channels_last buys
        for m in (unet, controlnet, vae):
            m.to(memory_format=torch.contiguous_format)
        out["ours_contiguous"], _ = run_ours(b)
        for m in (unet, controlnet, vae):
            m.to(memory_format=torch.channels_last)
        save()
    # last, because offloading moves the shared modules to the CPU; on the CPU (--quick) it is a no-op,
    # but the code path runs
    out["memory_options"] = memory_options_check(backend, rows[:2], seeds[:2], device)


def bench_sd2_compiled(args, device, steps: int, lr_size: int, out: dict, save) -> None:
    """torch.compile variant of our C-SD2 sampler on fresh modules (the eager section offloaded its own);
    run last so that a slow compile cannot cost the other measurements."""
    import torch

    parts = sd2_components(args, device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        parts[name].to(getattr(torch, dtype))
    rows, seeds = lr_batch(args, lr_size, device)
    started = time.perf_counter()
    b = sd2_backend(parts, device, steps, dtype, compile=True)
    out["ours_compiled"], _ = time_ours(b, rows, seeds, steps, out["tflop_per_candidate"] * 1e12, device)
    out["ours_compiled"]["seconds_including_compile"] = round(time.perf_counter() - started, 1)
    score(out)
    save()


def score(out: dict) -> None:
    """Speedup of the fastest `ours*` variant over the pipeline loop, and the C-SD2 goals."""
    best = min(
        (v for k, v in out.items() if k.startswith("ours") and isinstance(v, dict)),
        key=lambda v: v["s_per_candidate"],
    )
    out["speedup_vs_pipeline_loop"] = round(
        out["pipeline_loop"]["s_per_candidate"] / best["s_per_candidate"], 2
    )
    out["goals"] = {
        "speedup_ge_3x": out["speedup_vs_pipeline_loop"] >= 3,
        "s_per_candidate_le_0.15": best["s_per_candidate"] <= 0.15,
        "note": "goals apply at 512 px, 50 steps, CFG on a real GPU (not --quick)",
    }


def batch_sweep(b, lr_size: int, steps: int, sizes, device) -> list[dict]:
    """Seconds per candidate at several batch sizes, from 1- and 5-step runs: per-step cost plus a fixed part
    (text, VAE decode), extrapolated to `steps` — picks `sample.batch_size` without 50-step runs per size."""
    import torch

    results = []
    for n in sizes:
        reset_peak(device)
        lr = torch.rand(n, 3, lr_size, lr_size, generator=torch.Generator().manual_seed(n))
        seeds = list(range(n))
        times = {}
        for k in (1, 1, 5):  # the first 1-step call warms up (cudnn autotuning for this shape)
            b.num_inference_steps = k
            times[k], _ = timed(lambda lr=lr, seeds=seeds: b.sample(lr, seeds), device)
        per_step = (times[5] - times[1]) / 4
        fixed = max(times[1] - per_step, 0.0)
        results.append(
            {
                "rows": n,
                "s_per_step": round(per_step, 4),
                "fixed_s": round(fixed, 4),
                "s_per_candidate_extrapolated": round((fixed + steps * per_step) / n, 4),
                "peak_gib": peak_gib(device),
            }
        )
    b.num_inference_steps = steps
    return results


def memory_options_check(make_backend, rows, seeds, device) -> dict:
    """2-step samples with the memory options on, against the same rows with them off (runs last: offload
    moves the shared modules to the CPU). Offload must not change the result; tiling blends tiles, so only
    approximately."""

    def sample(**options):
        b = make_backend(**options)
        b.num_inference_steps = 2
        reset_peak(device)
        images = b.sample(rows, seeds)
        b.vae.disable_tiling()
        b.vae.disable_slicing()
        return images, peak_gib(device)

    plain, plain_peak = sample()
    tiled, tiled_peak = sample(enable_vae_tiling=True, enable_vae_slicing=True)
    offloaded, offload_peak = sample(cpu_offload=True)
    return {
        "plain_peak_gib": plain_peak,
        "vae_tiling_slicing": {
            "peak_gib": tiled_peak,
            "max_abs_diff": round(float((tiled - plain).abs().max()), 4),
        },
        "cpu_offload": {
            "peak_gib": offload_peak,
            "max_abs_diff": round(float((offloaded - plain).abs().max()), 5),
        },
    }


# ---- C-FLUX ----------------------------------------------------------------------------------------------
def bench_flux(args, device, steps: int, lr_size: int, out: dict, save) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxControlNetPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from dp2o.models._hf_common import upsample
    from dp2o.models.config import BackendConfig
    from dp2o.models.flux_controlnet import DEFAULT_CONTROLNET_LAYERS, DEFAULT_GUIDANCE, FluxControlNetBackend

    quick = args.quick
    t_cfg = dict(TINY_FLUX if quick else FLUX_TRANSFORMER)
    layers = args.flux_layers or (1 if quick else 19)
    single_layers = args.flux_single_layers if args.flux_single_layers is not None else (1 if quick else 38)
    t_cfg.update(num_layers=layers, num_single_layers=single_layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    # built directly in bf16 on the GPU: 12B parameters in fp32 would need 48 GiB before the cast
    torch.set_default_dtype(dtype)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**t_cfg).eval()
        controlnet = FluxControlNetModel.from_transformer(
            transformer,
            num_layers=DEFAULT_CONTROLNET_LAYERS,
            num_single_layers=0,
            attention_head_dim=t_cfg["attention_head_dim"],
            num_attention_heads=t_cfg["num_attention_heads"],
        )
        vae = AutoencoderKL(**(TINY_FLUX_VAE if quick else FLUX_VAE)).eval()
        clip_cfg = {**(TINY_TEXT if quick else FLUX_CLIP), "num_hidden_layers": 1}
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg)).eval()
        t5 = T5EncoderModel(T5Config(vocab_size=64, num_layers=1, **(TINY_T5 if quick else FLUX_T5))).eval()
    torch.set_default_dtype(torch.float32)
    components = {
        "transformer": transformer.to(dtype),
        "vae": vae.to(dtype),
        "text_encoder": text_encoder.to(dtype),
        "tokenizer": clip_tokenizer(),
        "text_encoder_2": t5.to(dtype),
        "tokenizer_2": t5_tokenizer(),
    }
    controlnet.to(dtype)
    rows, seeds = lr_batch(args, lr_size, device)
    out.update(
        {
            "steps": steps,
            "guidance": DEFAULT_GUIDANCE,
            "double_blocks": layers,
            "single_blocks": single_layers,
            "controlnet_double_blocks": DEFAULT_CONTROLNET_LAYERS,
            "note": "real FLUX widths; FLUX.1-dev has 19 double + 38 single blocks; 1-layer T5/CLIP (cached)",
            "params": {
                "transformer": sum(p.numel() for p in transformer.parameters()),
                "controlnet": sum(p.numel() for p in controlnet.parameters()),
            },
        }
    )
    pipe = FluxControlNetPipeline(
        controlnet=controlnet, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), **components
    )
    pipe.set_progress_bar_config(disable=True)
    size = 4 * lr_size

    def pipe_call(i: int, n_steps: int):
        return pipe(
            prompt="",
            control_image=(2 * upsample(rows[i : i + 1], 4) - 1).to(device, dtype),
            height=size,
            width=size,
            num_inference_steps=n_steps,
            guidance_scale=DEFAULT_GUIDANCE,
            generator=torch.Generator(device).manual_seed(seeds[i]),
            output_type="pt",
        ).images

    # FLOPs of one ControlNet + transformer forward on one row, at this size and a 512-token prompt
    b = FluxControlNetBackend(
        components={**components, "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)},
        controlnet=controlnet,
        cfg=BackendConfig(
            kind="flux-controlnet",
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            num_inference_steps=steps,
        ),
    )
    with torch.no_grad():
        from dp2o.models.flux_controlnet import FluxCondition

        text, pooled = b._text([""])
        control = b._encode_control(rows[:1], None)
        latents = torch.randn_like(control)
        img_ids, txt_ids = b._ids(1, size, size, text.shape[1])
        sigma = torch.full((1,), 0.5, device=device)
        flux_cond = FluxCondition(control=control, text=text, pooled=pooled)
        row_flops = count_flops(
            lambda: b._velocity(latents, sigma, flux_cond, img_ids, txt_ids, transformer, controlnet)
        )
    out["gflop_per_row_forward"] = round(row_flops / 1e9, 3)
    flops_per_candidate = row_flops * steps
    out["tflop_per_candidate"] = round(flops_per_candidate / 1e12, 3)

    pipe_call(0, 2)
    reset_peak(device)
    n = min(args.baseline_images, rows.shape[0])
    seconds, _ = timed(lambda: [pipe_call(i, steps) for i in range(n)], device)
    out["pipeline_loop"] = {"dtype": str(dtype), **summary(seconds, n, flops_per_candidate, device)}
    save()

    b.num_inference_steps = 2
    b.sample(rows, seeds)
    b.num_inference_steps = steps
    reset_peak(device)
    seconds, images = timed(lambda: b.sample(rows, seeds), device)
    out["ours"] = {"dtype": str(dtype), **summary(seconds, rows.shape[0], flops_per_candidate, device)}
    k = rows.shape[0] - 1
    alone = b.sample(rows[k : k + 1], seeds[k : k + 1])
    out["regenerated_alone_max_abs_diff"] = round(float((alone - images[k : k + 1]).abs().max()), 5)
    out["speedup_vs_pipeline_loop"] = round(
        out["pipeline_loop"]["s_per_candidate"] / out["ours"]["s_per_candidate"], 2
    )


if __name__ == "__main__":
    main()
