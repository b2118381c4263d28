"""Pretrain the built-in tiny diffusion SR model (×4) on the bundled training photos, on a CPU.

Random HR crops of `bundled://train` (never `bundled://heldout`) are degraded on the fly with the
Real-ESRGAN chain of `dp2o.degrade`, and the UNet learns to
denoise the residual `hr − bicubic(lr)` with the standard ε-prediction loss. The weights written are an
exponential moving average (EMA) of the trained ones: with a few thousand steps, the raw weights still jump
between mini-batches and give visibly noisier samples than their average.

Every random draw (crop position, flips, degradation parameters, timesteps, noise) comes from a generator
derived from `--seed`, so the same command gives the same weights (up to float nondeterminism of threads).

    python -m scripts.pretrain_tiny                      # writes dp2o/weights/tiny-sr/
    python -m scripts.pretrain_tiny --steps 50 --out runs/tiny-smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image

from dp2o.data import bundled_files
from dp2o.degrade.config import DegradationConfig
from dp2o.degrade.crops import degraded_crops
from dp2o.degrade.ingest import list_sources, load_hr
from dp2o.degrade.params import sample_params
from dp2o.degrade.pipeline import degrade_batch
from dp2o.evaluate import sample_candidates
from dp2o.models.tiny import DEFAULT_NUM_INFERENCE_STEPS, TinyBackend, bundled_weights_dir
from dp2o.seeding import derive_seed, numpy_rng, torch_generator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=bundled_weights_dir(), help="output folder (diffusers layout)")
    p.add_argument(
        "--source", default="bundled://train", help="HR photos: bundled://train (held-out is refused)"
    )
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=12, help="HR crops per step")
    p.add_argument("--crop-min", type=int, default=80, help="smallest HR crop side (multiple of 8)")
    p.add_argument("--crop-max", type=int, default=96, help="largest HR crop side (multiple of 8)")
    p.add_argument(
        "--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay, 100-step warm-up)"
    )
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights")
    p.add_argument("--seed", type=int, default=0, help="global seed of every random draw")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=100, help="print the mean loss every this many steps")
    p.add_argument(
        "--half", action=argparse.BooleanOptionalAction, default=True, help="store float16 weights"
    )
    p.add_argument(
        "--verify-only",
        action="store_true",
        help="skip training; compare the model in --out with bicubic upsampling on held-out crops",
    )
    p.add_argument(
        "--verify-inputs", type=int, default=10, help="held-out crops for the comparison with bicubic"
    )
    p.add_argument("--verify-seeds", type=int, default=4, help="candidates (seeds) per held-out crop")
    p.add_argument("--verify-crop", type=int, default=128, help="HR side of the held-out crops")
    p.add_argument(
        "--report-dir", type=Path, default=Path("docs/tiny_model"), help="where the grid and JSON go"
    )
    args = p.parse_args(argv)
    if "heldout" in args.source or "all" in args.source:
        p.error(f"--source {args.source!r} would train on held-out photos; use bundled://train")
    if args.crop_min % 8 or args.crop_max % 8 or args.crop_min > args.crop_max:
        p.error("--crop-min/--crop-max must be multiples of 8 with crop-min <= crop-max")
    return args


def load_photos(source: str) -> list[torch.Tensor]:
    """The source photos as uint8 [3, H, W] tensors (RGB)."""
    return [
        torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()
        for path in bundled_files(source)
    ]


def random_crops(photos: list[torch.Tensor], size: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n random size×size crops (random photo, position, flip, 90° rotation) → uint8 [n, 3, size, size]."""
    crops = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        y = rng.integers(img.shape[1] - size + 1)
        x = rng.integers(img.shape[2] - size + 1)
        crop = img[:, y : y + size, x : x + size]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        crops.append(torch.rot90(crop, int(rng.integers(4)), dims=(1, 2)))
    return torch.stack(crops)


def make_degrader(seed: int):
    """A function (hr uint8 [B,3,H,W], step) → (hr_target uint8 [B,3,H,W], lr uint8 [B,3,H/4,W/4]) applying
    the Real-ESRGAN chain of `dp2o.degrade` with parameters drawn per (seed, step, row)."""
    cfg = DegradationConfig()

    def degrade(hr: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        params = [sample_params(cfg, derive_seed(seed, "pretrain-degrade", step, i)) for i in range(len(hr))]
        return degrade_batch(hr, params, cfg)

    return degrade


def verify(args: argparse.Namespace) -> dict:
    """Held-out check of the model in args.out: offline reward and raw metrics of its samples vs bicubic
    upsampling, per-pixel std across seeds, sampling speed, and a PNG grid. Returns (and writes) a JSON record."""
    from dp2o.evaluate.scoring import RewardModel

    photos = [load_hr(ref, min_size=args.verify_crop) for ref in list_sources("bundled://heldout")]
    crop = args.verify_crop
    ids = [f"verify-{i:03d}" for i in range(args.verify_inputs)]
    hr, lr = degraded_crops(photos, len(ids), crop, args.seed, "verify")
    lr01 = lr.float() / 255
    backend = TinyBackend.from_pretrained(args.out)
    backend.eval()
    m = args.verify_seeds
    start = time.time()
    # seeds 0..m-1 for every input, one batch per input, as the record has always been measured
    cands = sample_candidates(backend, ids, lr, m, args.seed, batch=m, seed_of=lambda sid, c: c)
    seconds_per_candidate = (time.time() - start) / (len(ids) * m)
    bicubic = F.interpolate(lr01, scale_factor=4, mode="bicubic").clamp(0, 1)[:, None]
    model = RewardModel("offline")
    rewards = model.reward(
        model.raw(ids, torch.cat([bicubic, cands], dim=1), hr)
    )  # bounds fitted on bicubic and samples together, so both share one scale
    is_bicubic = pc.equal(rewards["candidate"], 0)
    summary = {}
    for name, mask in (("bicubic", is_bicubic), ("tiny", pc.invert(is_bicubic))):
        part = rewards.filter(mask)
        summary[name] = {c: float(np.mean(part[c])) for c in ["reward", *model.metric_names]}
    record = {
        "inputs": len(ids),
        "crop": crop,
        "seeds": m,
        "num_inference_steps": backend.num_inference_steps,
        "threads": torch.get_num_threads(),
        "seconds_per_candidate": seconds_per_candidate,
        "candidates_per_second": 1 / seconds_per_candidate,
        "pixel_std_across_seeds": float(cands.std(dim=1).mean()),
        "pixel_std_across_seeds_255": float(cands.std(dim=1).mean() * 255),
        "mean": summary,
        "tiny_minus_bicubic_reward": summary["tiny"]["reward"] - summary["bicubic"]["reward"],
    }
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "verify.json").write_text(json.dumps(record, indent=2) + "\n")
    save_grid(lr01[:3], bicubic[:3, 0], cands[:3], hr[:3], args.report_dir / "seeds_grid.png")
    print(json.dumps(record, indent=2))
    return record


def save_grid(
    lr: torch.Tensor, bicubic: torch.Tensor, cands: torch.Tensor, hr: torch.Tensor, path: Path
) -> None:
    """Rows: inputs; columns: LR (nearest ×4), bicubic, each seed's sample, std across seeds (×4 gain), HR."""
    rows = []
    for i in range(lr.shape[0]):
        std = (
            (cands[i].std(dim=0, keepdim=True).mean(dim=1, keepdim=True) * 4).clamp(0, 1).expand(1, 3, -1, -1)
        )
        tiles = [
            F.interpolate(lr[i : i + 1], scale_factor=4, mode="nearest"),
            bicubic[i : i + 1],
            cands[i],
            std,
            hr[i : i + 1].float() / 255,
        ]
        rows.append(torch.cat([torch.cat(list(t), dim=2) for t in tiles], dim=2))
    grid = torch.cat(rows, dim=1)
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.verify_only:
        verify(args)
        return
    photos = load_photos(args.source)
    degrade = make_degrader(args.seed)
    backend = TinyBackend.from_random(seed=derive_seed(args.seed, "pretrain-init") % 2**32)
    ema = copy.deepcopy(backend.unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(backend.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(100, args.steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps)),
    )
    crop_rng = numpy_rng(derive_seed(args.seed, "pretrain-crop"))
    noise_gen = torch_generator(derive_seed(args.seed, "pretrain-noise"))
    sizes = list(range(args.crop_min, args.crop_max + 1, 8))
    backend.train()
    start, losses = time.time(), []
    for step in range(args.steps):
        hr = random_crops(photos, sizes[crop_rng.integers(len(sizes))], args.batch_size, crop_rng)
        hr, lr = degrade(hr, step)
        batch = backend.make_noised_batch(hr.float() / 255, lr.float() / 255, noise_gen)
        loss = backend.policy_errors(batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backend.trainable_parameters(), 1.0)
        opt.step()
        sched.step()
        # Early EMA uses a shorter horizon so the average is not dominated by the random initialisation.
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), backend.unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(
                f"step {step + 1:5d}/{args.steps}  loss {np.mean(losses[-args.log_every :]):.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - start:6.0f}s",
                flush=True,
            )
    backend.unet.load_state_dict(ema.state_dict())
    backend.num_inference_steps = DEFAULT_NUM_INFERENCE_STEPS
    backend.save_pretrained(args.out, half_precision=args.half)
    # paths are left out: they are machine-specific and the folder itself says where it is
    record = {k: v for k, v in vars(args).items() if not isinstance(v, Path)}
    record.update(final_loss=float(np.mean(losses[-args.log_every :])), seconds=round(time.time() - start, 1))
    (Path(args.out) / "pretrain_args.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} in {record['seconds']} s")
    verify(args)


if __name__ == "__main__":
    main()
