"""Tiny real diffusers/transformers components for the backend tests, and tests of the shared plumbing.

The builders seed torch before each component so every test sees the same weights; sizes are the smallest
the classes accept, so a full sample + training step runs in well under a second on one CPU core.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dp2o.models import BackendConfig, BackendError, build_backend
from dp2o.models._hf_common import check_lr
from tests.helpers import assert_starts_at_ln2

WORDS = [
    "a",
    "photo",
    "of",
    "cat",
    "dog",
    "dotted",
    "noise",
    "blur",
    "lowres",
    "smooth",
    ",",
    "sharp",
    "tree",
]


def tiny_clip(hidden: int = 32, seed: int = 0):
    """(CLIPTextModel, CLIPTokenizer) with a word-level vocabulary built in memory."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in WORDS:
        vocab.setdefault(w + "</w>", len(vocab))
    for ch in sorted({c for w in WORDS for c in w}):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=32,
        projection_dim=hidden,
    )
    return CLIPTextModel(config).eval(), tokenizer


def randomise_zero_convs(controlnet: torch.nn.Module, seed: int) -> None:
    """ControlNets start with zero output convs (no effect on the UNet); give them weights so tests see the control."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_blocks", "controlnet_x")
            ):
                p.normal_(0, 0.3)


def tiny_sd_unet(in_channels: int = 4, seed: int = 0, **kwargs):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
        **kwargs,
    ).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, blocks: int = 2, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16)[:blocks],
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels,
        norm_num_groups=4,
        **kwargs,
    ).eval()


def tiny_sd2_folder(root: Path, *, prediction_type: str = "epsilon") -> tuple[Path, Path]:
    """A tiny SD2 diffusers folder and a ControlNet folder (random zero convs); returns (model, controlnet)."""
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionPipeline

    unet = tiny_sd_unet(seed=1)
    text_encoder, tokenizer = tiny_clip(seed=2)
    # SD2 folders ship a non-DDPM scheduler config; the backend must rebuild DDPM from it
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed=3),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    model = root / "sd2"
    pipe.save_pretrained(model)
    torch.manual_seed(4)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    randomise_zero_convs(controlnet, seed=5)
    controlnet.save_pretrained(root / "controlnet")
    return model, root / "controlnet"


def tiny_upscaler_folder(root: Path) -> Path:
    """A tiny StableDiffusionUpscalePipeline folder: 7-channel UNet, ×4 VAE, DDIM v-prediction like the real one."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    text_encoder, tokenizer = tiny_clip(seed=2)
    pipe = StableDiffusionUpscalePipeline(
        vae=tiny_vae(seed=3, blocks=3, scaling_factor=0.08333),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_sd_unet(in_channels=7, seed=1, num_class_embeds=100),
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear"),
        scheduler=DDIMScheduler(
            prediction_type="v_prediction", beta_schedule="scaled_linear", set_alpha_to_one=False
        ),
        max_noise_level=350,
    )
    pipe.save_pretrained(root / "upscaler")
    return root / "upscaler"


def tiny_t5(d_model: int = 32, seed: int = 0):
    """(T5EncoderModel, T5TokenizerFast) with a unigram vocabulary built in memory."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in sorted({c for w in WORDS for c in w})]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(pieces), d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4, pad_token_id=0
    )
    return T5EncoderModel(config).eval(), tokenizer


def tiny_flux_folder(root: Path) -> tuple[Path, Path]:
    """A tiny FLUX diffusers folder and a 1-block FluxControlNetModel folder (random zero layers)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(1)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    text_encoder, tokenizer = tiny_clip(seed=2)
    text_encoder_2, tokenizer_2 = tiny_t5(seed=3)
    vae = tiny_vae(
        seed=4, shift_factor=0.06, scaling_factor=0.4, use_quant_conv=False, use_post_quant_conv=False
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(root / "flux")
    torch.manual_seed(5)
    controlnet = FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=0, attention_head_dim=8, num_attention_heads=2
    )
    randomise_zero_convs(controlnet, seed=6)
    controlnet.save_pretrained(root / "flux-controlnet")
    return root / "flux", root / "flux-controlnet"


# ---- tests of what the three diffusers backends share --------------------------------------------------
@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return tiny_sd2_folder(tmp_path_factory.mktemp("sd2"))


def sd2_config(model, controlnet, **kw) -> BackendConfig:
    return BackendConfig(
        kind="sd2-controlnet", model=str(model), controlnet=str(controlnet), num_inference_steps=2, **kw
    )


@pytest.mark.parametrize("kind", ["sd2-controlnet", "flux-controlnet", "sd-x4-upscaler"])
def test_missing_folder_names_the_model_field(tmp_path, kind):
    with pytest.raises(BackendError, match=r"`model`: .*does not exist"):
        build_backend(BackendConfig(kind=kind, model=str(tmp_path / "nowhere")))
    with pytest.raises(BackendError, match=r"`model` is not set"):
        build_backend(BackendConfig(kind=kind))


def test_wrong_model_class_is_refused(sd2):
    model, _ = sd2
    with pytest.raises(
        BackendError, match=r"`model`: .*StableDiffusionPipeline.*StableDiffusionUpscalePipeline"
    ):
        build_backend(BackendConfig(kind="sd-x4-upscaler", model=str(model)))
    with pytest.raises(
        BackendError, match=r"`controlnet`: .*holds a UNet2DConditionModel, expected a ControlNetModel"
    ):
        build_backend(sd2_config(model, model / "unet"))
    with pytest.raises(BackendError, match=r"`controlnet`: .*\.safetensors.* does not exist"):
        build_backend(sd2_config(model, model / "absent.safetensors"))


@pytest.mark.parametrize("kind", ["sd2-controlnet", "flux-controlnet", "sd-x4-upscaler"])
def test_unreachable_hub_id_fails_fast_with_the_fix(monkeypatch, kind):
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(BackendError, match=r"`model`: .*neither a local folder nor a hub repo.*HF_HOME"):
        build_backend(BackendConfig(kind=kind, model="dp2o-tests/not-a-real-repo"))
    assert time.perf_counter() - start < 5


def test_bad_batches_are_refused_with_the_fix(sd2):
    b = build_backend(sd2_config(*sd2))
    lr = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="one seed per row"):
        b.sample(lr, seeds=[1])
    with pytest.raises(ValueError, match="one prompt per row"):
        b.sample(lr, seeds=[1, 2], prompts=["a"])
    with pytest.raises(ValueError, match=r"\[B, 3, h, w\]"):
        b.sample(torch.rand(3, 8, 8), seeds=[1])
    # real SD2 latents are 1/8 of the output: a 7-pixel-wide LR gives 28 px, which no latent grid fits
    with pytest.raises(ValueError, match="4x28, which must be a multiple of 8"):
        check_lr(torch.rand(1, 3, 1, 7), multiple=8, scale=4)


def test_accelerate_wrapped_policy_still_starts_at_ln2(sd2):
    from accelerate import Accelerator

    from dp2o.train.losses import dpo_loss

    b = build_backend(sd2_config(*sd2))
    b.accelerate_prepare(Accelerator(cpu=True))
    b.train()
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = b.make_noised_batch(torch.rand(2, 3, 32, 32), lr, torch.Generator().manual_seed(1))
    err, ref = b.prediction_errors(batch)
    loss, _ = dpo_loss(err[:1], ref[:1], err[1:], ref[1:], beta=5000.0)
    assert_starts_at_ln2(loss, err, ref, beta=5000.0)


def test_gpu_benchmark_dry_run_on_cpu_writes_its_json(tmp_path):
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "sample_gpu.json"
    args = ["--quick", "--n-lr", "2", "--n-seeds", "2", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sample_gpu", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("sd2", "flux"):
        part = result[name]
        assert part["ours"]["candidates"] == 4 and part["pipeline_loop"]["candidates"] == 2
        assert part["speedup_vs_pipeline_loop"] > 0
        assert part["regenerated_alone_max_abs_diff"] < 1e-5
