"""C-SD2: Stable Diffusion 2 (base, 512 px) plus a full ControlNet that sees the LR upsampled ×4 (bicubic).

Sampling is DDPM (50 steps) with classifier-free guidance 3.5 and the negative prompt of DP²O-SR; training
trains only the ControlNet (fully, or LoRA adapters) and compares it with a frozen reference.

Design choice: we run our own denoising loop around the diffusers components (unet, controlnet, vae,
scheduler) instead of calling `StableDiffusionControlNetPipeline`, so that many (LR, seed) rows share one
batched loop while each row keeps its own generator for the initial latents *and* the DDPM step noise.
The loop mirrors the pipeline's arithmetic step for step; a test checks that one row reproduces the
pipeline called with the same seed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from dp2o import stopping
from dp2o.models._hf_common import (
    DiffusersBackend,
    PromptCache,
    TrainableModule,
    autocast,
    check_keys,
    check_lr,
    check_pipeline_class,
    check_source,
    check_target,
    configure_memory,
    load_component,
    load_scheduler,
    resolve_device,
    resolve_dtype,
    row_generators,
    row_prompts,
    upsample,
)
from dp2o.models.base import BackendError, NoisedBatch, draw_timesteps
from dp2o.models.config import BackendConfig
from dp2o.train.losses import per_sample_mse

log = logging.getLogger(__name__)

DEFAULT_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 3.5
#: attention projections and resnet convs: where a LoRA changes what a ControlNet extracts from its input
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline")


@dataclass(frozen=True)
class SD2Condition:
    """control: [B, 3, H, W] in [0, 1] (LR upsampled to output size); text: [B, L, D] prompt embeddings."""

    control: torch.Tensor
    text: torch.Tensor


def _conditioning_channels(state: dict[str, torch.Tensor], path: Path) -> tuple[int, tuple[int, ...]]:
    """(input channels, conditioning_embedding_out_channels) read off a diffusers ControlNet state dict."""
    key = "controlnet_cond_embedding.conv_in.weight"
    if key not in state:
        raise BackendError(
            f"`controlnet`: {path} has no {key!r}; it must be a diffusers-format ControlNetModel state dict "
            "(convert original-format ControlNet checkpoints with diffusers' conversion script first)"
        )
    channels = [state[key].shape[0]]
    j = 1
    while f"controlnet_cond_embedding.blocks.{j}.weight" in state:
        channels.append(state[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0])
        j += 2
    return state[key].shape[1], tuple(channels)


def load_controlnet(source: str | None, unet, dtype: torch.dtype):
    """ControlNetModel from a diffusers folder/hub id, from a single .safetensors state dict, or fresh.

    A single file (as in the official release) is applied to a ControlNet created `from_unet(unet)` with the
    conditioning embedding read off the file; every key must match. None creates a fresh ControlNet copied
    from the base UNet (zero-initialised outputs, so it starts as plain SD2).
    """
    from diffusers import ControlNetModel

    if source is None:
        log.warning("`controlnet` is not set: creating a fresh ControlNet from the base UNet (untrained)")
        return ControlNetModel.from_unet(unet).to(dtype)
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        path = Path(source).expanduser()
        if not path.is_file():
            raise BackendError(
                f"`controlnet`: file {source!r} does not exist; give the ControlNet .safetensors path"
            )
        state = load_file(str(path))
        in_channels, channels = _conditioning_channels(state, path)
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=channels,
            conditioning_channels=in_channels,
            load_weights_from_unet=False,
        )
        missing, unexpected = controlnet.load_state_dict(state, strict=False)
        check_keys(missing, unexpected, path)
        return controlnet.to(dtype)
    source = check_source(source, "controlnet", "a diffusers ControlNetModel")
    subfolder = "controlnet" if (Path(source) / "controlnet" / "config.json").is_file() else None
    return load_component(ControlNetModel, source, field="controlnet", subfolder=subfolder, torch_dtype=dtype)


class SD2ControlNetBackend(DiffusersBackend):
    """C-SD2 behind the `Backend` interface. Build with `from_config`."""

    name = "sd2-controlnet"
    scale = 4

    def __init__(self, *, vae, text_encoder, tokenizer, unet, controlnet, scheduler, cfg: BackendConfig):
        from diffusers import StableDiffusionControlNetPipeline

        self._device = resolve_device(cfg)
        self._dtype = resolve_dtype(cfg, self._device)
        self.cfg = cfg
        self.num_inference_steps = cfg.num_inference_steps or DEFAULT_STEPS
        self.guidance_scale = DEFAULT_GUIDANCE if cfg.guidance_scale is None else cfg.guidance_scale
        self.negative_prompt = DEFAULT_NEGATIVE_PROMPT if cfg.negative_prompt is None else cfg.negative_prompt
        self._sampler = scheduler
        self._noiser = DDPMScheduler.from_config(scheduler.config)
        self.prediction_type = self._noiser.config.prediction_type
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        for frozen in (vae, text_encoder, unet):
            frozen.requires_grad_(False).eval()
        self._trainable = TrainableModule(controlnet, lora_rank=cfg.lora_rank, lora_targets=LORA_TARGETS)
        self.controlnet = controlnet
        self._vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.pipeline = StableDiffusionControlNetPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            controlnet=controlnet,
            scheduler=self._sampler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipeline.set_progress_bar_config(disable=True)
        if cfg.cpu_offload and self._device.type != "cpu":
            self.pipeline.enable_model_cpu_offload(device=self._device)
        else:
            self.pipeline.to(self._device)
        if self._device.type == "cuda":
            for module in (unet, controlnet, vae):
                module.to(memory_format=torch.channels_last)
        configure_memory(vae, cfg)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            controlnet.enable_gradient_checkpointing()
        self._unet_fwd = torch.compile(unet) if cfg.compile else unet
        self._controlnet_fwd = torch.compile(controlnet) if cfg.compile else controlnet
        self._text = PromptCache(self._encode_prompt)

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> SD2ControlNetBackend:
        """Load SD2 components from `cfg.model` and the ControlNet from `cfg.controlnet` (see `load_controlnet`)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        what = "Stable Diffusion 2 (diffusers layout, e.g. stabilityai/stable-diffusion-2-base)"
        source = check_source(cfg.model, "model", what)
        check_pipeline_class(source, field="model", allowed=_PIPELINES, what=what)
        dtype = resolve_dtype(cfg, resolve_device(cfg))
        kw = {"field": "model", "torch_dtype": dtype}
        unet = load_component(UNet2DConditionModel, source, subfolder="unet", **kw)
        return cls(
            vae=load_component(AutoencoderKL, source, subfolder="vae", **kw),
            text_encoder=load_component(CLIPTextModel, source, subfolder="text_encoder", **kw),
            tokenizer=load_component(CLIPTokenizer, source, field="model", subfolder="tokenizer"),
            unet=unet,
            controlnet=load_controlnet(cfg.controlnet, unet, dtype),
            # DDPM as in the paper, whatever scheduler class the folder ships; its config keeps the betas
            # and the prediction type
            scheduler=load_scheduler(source, field="model", subfolder="scheduler", cls=DDPMScheduler),
            cfg=cfg,
        )

    # ---- sampling -------------------------------------------------------------------------------------
    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(prompt, self._device, 1, False)
        return (embeds.to(self._dtype),)

    def _denoise(self, x, t, text, control, unet, controlnet) -> torch.Tensor:
        with autocast(self._device, self._dtype):
            down, mid = controlnet(
                x, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False
            )
            return unet(
                x,
                t,
                encoder_hidden_states=text,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]

    @torch.no_grad()
    def sample(
        self, lr: torch.Tensor, seeds: Sequence[int], prompts: Sequence[str] | None = None
    ) -> torch.Tensor:
        """lr [B, 3, h, w] in [0, 1] → SR [B, 3, 4h, 4w] float32 in [0, 1] on the CPU; row i depends only on seeds[i]."""
        from diffusers.utils.torch_utils import randn_tensor

        check_lr(lr, self._vae_scale, self.scale)
        batch = lr.shape[0]
        generators = row_generators(seeds, batch)
        (text,) = self._text(row_prompts(prompts, self.cfg.prompt, batch))
        control = upsample(lr, self.scale).to(self._device, self._dtype)
        guided = self.guidance_scale > 1
        if guided:
            (negative,) = self._text([self.negative_prompt] * batch)
            text, control = torch.cat([negative, text]), torch.cat([control, control])
        height, width = control.shape[-2:]
        shape = (batch, self.unet.config.in_channels, height // self._vae_scale, width // self._vae_scale)
        latents = randn_tensor(shape, generator=generators, device=self._device, dtype=self._dtype)
        latents = latents * self._sampler.init_noise_sigma
        self._sampler.set_timesteps(self.num_inference_steps, device=self._device)
        for t in self._sampler.timesteps:
            stopping.check()  # once per denoising step
            x = torch.cat([latents, latents]) if guided else latents
            x = self._sampler.scale_model_input(x, t)
            pred = self._denoise(x, t, text, control, self._unet_fwd, self._controlnet_fwd)
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + self.guidance_scale * (cond - uncond)
            latents = self._sampler.step(pred, t, latents, generator=generators, return_dict=False)[0]
            latents = latents.to(self._dtype)
        images = self._decode(latents)
        self.pipeline.maybe_free_model_hooks()  # with cpu_offload: hand the GPU back between calls
        return images

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1).cpu()

    # ---- training -------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_noised_batch(
        self,
        target: torch.Tensor,
        lr: torch.Tensor,
        generator: torch.Generator,
        prompts: Sequence[str] | None = None,
        t_range: tuple[float, float] = (0.0, 1.0),
    ) -> NoisedBatch:
        """target [B, 3, 4h, 4w] in [0, 1] → VAE latents; t uniform over `t_range` of the 1000 training steps; ε ~ N(0, I)."""
        from diffusers.utils.torch_utils import randn_tensor

        check_lr(lr, self._vae_scale, self.scale)
        check_target(target, lr, self.scale)
        batch = target.shape[0]
        pixels = (2 * target - 1).to(self._device, self._dtype)
        posterior = self.vae.encode(pixels).latent_dist
        x0 = (posterior.sample(generator=generator) * self.vae.config.scaling_factor).float()
        noise = randn_tensor(x0.shape, generator=generator, device=self._device, dtype=torch.float32)
        t = draw_timesteps(batch, self._noiser.config.num_train_timesteps, t_range, generator)
        (text,) = self._text(row_prompts(prompts, self.cfg.prompt, batch))
        control = upsample(lr, self.scale).to(self._device, self._dtype)
        return NoisedBatch(
            x0=x0, noise=noise, t=t.to(self._device), cond=SD2Condition(control=control, text=text)
        )

    def prediction_errors(self, batch: NoisedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self._noiser.add_noise(batch.x0, batch.noise, batch.t).to(self._dtype)
        if self.prediction_type == "v_prediction":
            target = self._noiser.get_velocity(batch.x0, batch.noise, batch.t)
        else:
            target = batch.noise
        cond: SD2Condition = batch.cond
        pred = self._denoise(noisy, batch.t, cond.text, cond.control, self.unet, self._trainable.policy)
        with self._trainable.as_reference() as reference:
            ref = self._denoise(noisy, batch.t, cond.text, cond.control, self.unet, reference)
        return per_sample_mse(pred, target), per_sample_mse(ref, target)
