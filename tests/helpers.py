"""Shared builders for stage tests: small HR folders cut from bundled photos, and tiny pipeline configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dp2o.config import PipelineConfig
from dp2o.data import bundled_files


def make_hr_folder(folder: Path, n: int = 4, size: int = 112) -> Path:
    """n RGB photos (PNG and JPEG) of `size` px cut from different places of the bundled photos."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in bundled_files("bundled://train")]
    for i in range(n):
        img = photos[i % len(photos)]
        y = (37 * i) % (img.shape[0] - size)
        x = (53 * i) % (img.shape[1] - size)
        crop = Image.fromarray(img[y : y + size, x : x + size])
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        if i % 3 == 2:
            crop.save(sub / f"photo_{i:02d}.jpg", quality=95)
        else:
            crop.save(sub / f"photo_{i:02d}.png")
    return folder


_TINY_DIR: Path | None = None

#: a deliberately small UNet so stage tests spend their time in the pipeline, not in convolutions
TEST_UNET = {
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}


def tiny_model_dir() -> Path:
    """A randomly initialised tiny-sr model saved with save_pretrained (built once per test process)."""
    global _TINY_DIR
    if _TINY_DIR is None:
        import tempfile

        from dp2o.models.tiny import TinyBackend

        folder = Path(tempfile.mkdtemp(prefix="dp2o-tiny-")) / "tiny-sr"
        TinyBackend.from_random(seed=0, unet_config=TEST_UNET).save_pretrained(folder)
        _TINY_DIR = folder
    return _TINY_DIR


def tiny_pipeline_config(root: str, hr: str, **sections) -> PipelineConfig:
    data = {
        "root": root,
        "degrade": {
            "input": hr,
            "crop_size": 96,
            "crops_per_image": 2,
            "images_per_shard": 2,
            "batch_size": 4,
        },
        "sample": {
            "backend": {"kind": "tiny", "model": str(tiny_model_dir()), "num_inference_steps": 3},
            "num_candidates": 4,
            "batch_size": 8,
        },
        "score": {"metrics": "offline", "batch_size": 4},
        "pairs": {"n_top": 1, "weighting": "hpo"},
        "train": {
            "steps": 3,
            "pairs_per_step": 4,
            "micro_batch": 4,
            "learning_rate": 1e-4,
            "checkpoint_every": 1,
            "log_every": 1,
        },
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return PipelineConfig.model_validate(data)


def stage_files(stage_dir: Path) -> dict[str, bytes]:
    """Every committed data/model file of a stage folder, by relative path (markers and manifests excluded:
    they hold timings)."""
    out = {}
    for p in sorted(stage_dir.rglob("*")):
        rel = p.relative_to(stage_dir).as_posix()
        if p.is_file() and (rel.startswith("data/") or rel.startswith("model/")):
            out[rel] = p.read_bytes()
    return out


#: float32 machine epsilon; the policy's and the reference's forward passes may differ by a few units of it
FLOAT32_EPS = 2.0**-23
#: how many ulps (per error value) two forward passes through identical weights may differ: different
#: batching or kernels (CPU vendor, thread count, accelerate wrapping) reorder float sums
PASS_ULPS = 16


def assert_starts_at_ln2(loss, err, err_ref, *, beta: float) -> None:
    """The first DPO loss before any update is ln 2 up to the float error of the two forward passes.

    err, err_ref: [2P] policy and reference errors, winners first. What "starts at ln 2" means: (1) the policy
    equals the reference, so their errors agree to a few float32 ulps; (2) the loss is the DPO formula of
    those errors; (3) hence |loss - ln 2| <= (β/4)·max|Δ| with |Δ| <= 4·PASS_ULPS·eps·max|err|, because
    d softplus(βΔ/2)/dΔ <= β/2·(1/2) near Δ = 0. β ≈ 5000 amplifies a 1-ulp difference to ~1e-4 in the loss,
    so a fixed 1e-6 tolerance passes on one CPU and fails on another.
    """
    import math

    import torch
    import torch.nn.functional as F

    err, err_ref = err.detach().double(), err_ref.detach().double()
    scale = float(torch.maximum(err.abs().max(), err_ref.abs().max()))
    ulps = PASS_ULPS * FLOAT32_EPS * scale
    assert float((err - err_ref).abs().max()) <= ulps, "policy and reference must start identical"
    p = err.shape[0] // 2
    delta = (err[:p] - err_ref[:p]) - (err[p:] - err_ref[p:])
    expected = float(F.softplus(beta / 2 * delta).mean())
    assert abs(loss.item() - expected) <= 1e-6 + 1e-6 * expected, "loss must be the DPO formula of the errors"
    bound = beta / 4 * 4 * ulps
    assert abs(loss.item() - math.log(2)) <= bound + 1e-6, (loss.item(), bound)
