"""Stable Diffusion x4 upscaler (stabilityai/stable-diffusion-x4-upscaler) as a Real-ISR backend.

The UNet sees the latents concatenated with the LR image itself (7 input channels), and the LR is first
noised to a fixed `noise_level` by a second (low-res) DDPM scheduler, as in diffusers'
`StableDiffusionUpscalePipeline`, whose defaults we keep: the scheduler shipped in the folder (DDIM, η = 0),
75 steps, guidance 9, noise level 20. The model predicts v (read from its scheduler config).

Design choice: there is no ControlNet here, so the trainable module is the UNet itself (fully or LoRA);
its VAE latents have the LR's own size (VAE factor 4), which is where the ×4 comes from.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from dp2o import stopping
from dp2o.models._hf_common import (
    DiffusersBackend,
    PromptCache,
    TrainableModule,
    autocast,
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
)
from dp2o.models.base import NoisedBatch, draw_timesteps
from dp2o.models.config import BackendConfig
from dp2o.seeding import derive_seed, torch_generator
from dp2o.train.losses import per_sample_mse

DEFAULT_STEPS = 75
DEFAULT_GUIDANCE = 9.0
#: how much the LR is noised before it conditions the UNet (the pipeline's default; 0..max_noise_level)
NOISE_LEVEL = 20
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


@dataclass(frozen=True)
class UpscalerCondition:
    """image: [B, 3, h, w] noised LR in [-1, 1]-ish; noise_level: [B] int64; text: [B, L, D] embeddings."""

    image: torch.Tensor
    noise_level: torch.Tensor
    text: torch.Tensor


def _content_generators(lr: torch.Tensor, generator: torch.Generator) -> list[torch.Generator]:
    """Per-row generators for the LR noise in training, seeded by (the batch generator's seed, the row's pixels).

    The noised LR is part of the condition, and DPO needs a winner and its loser to share it; both rows hold
    the same LR, so seeding by content gives them the same noise without the caller knowing about it.
    """
    base = generator.initial_seed()
    rows = lr.detach().float().cpu().contiguous()
    return [
        torch_generator(
            derive_seed(base, "upscaler-lr-noise", hashlib.blake2b(r.numpy().tobytes()).hexdigest())
        )
        for r in rows
    ]


class SDUpscalerBackend(DiffusersBackend):
    """The SD x4 upscaler behind the `Backend` interface. Build with `from_config`."""

    name = "sd-x4-upscaler"

    def __init__(
        self, *, vae, text_encoder, tokenizer, unet, scheduler, low_res_scheduler, cfg: BackendConfig
    ):
        from diffusers import StableDiffusionUpscalePipeline

        self._device = resolve_device(cfg)
        self._dtype = resolve_dtype(cfg, self._device)
        self.cfg = cfg
        self.num_inference_steps = cfg.num_inference_steps or DEFAULT_STEPS
        self.guidance_scale = DEFAULT_GUIDANCE if cfg.guidance_scale is None else cfg.guidance_scale
        self.negative_prompt = cfg.negative_prompt or ""
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self._sampler = scheduler
        self._low_res = low_res_scheduler
        self._noiser = DDPMScheduler.from_config(scheduler.config)
        self.prediction_type = self._noiser.config.prediction_type
        self.vae, self.text_encoder = vae, text_encoder
        for frozen in (vae, text_encoder):
            frozen.requires_grad_(False).eval()
        self._trainable = TrainableModule(unet, lora_rank=cfg.lora_rank, lora_targets=LORA_TARGETS)
        self.unet = unet
        self.pipeline = StableDiffusionUpscalePipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            low_res_scheduler=low_res_scheduler,
            scheduler=scheduler,
        )
        self.pipeline.set_progress_bar_config(disable=True)
        if cfg.cpu_offload and self._device.type != "cpu":
            self.pipeline.enable_model_cpu_offload(device=self._device)
        else:
            self.pipeline.to(self._device)
        if self._device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
        # fp16 overflows in this VAE's decoder (the pipeline upcasts it too); bf16 has the range
        self._vae_dtype = (
            torch.float32 if self._dtype == torch.float16 and vae.config.force_upcast else self._dtype
        )
        vae.to(self._vae_dtype)
        configure_memory(vae, cfg)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self._unet_fwd = torch.compile(unet) if cfg.compile else unet
        self._step_kwargs = set(inspect.signature(scheduler.step).parameters)
        self._text = PromptCache(self._encode_prompt)

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> SDUpscalerBackend:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        what = "the SD x4 upscaler (diffusers layout, e.g. stabilityai/stable-diffusion-x4-upscaler)"
        source = check_source(cfg.model, "model", what)
        check_pipeline_class(source, field="model", allowed=("StableDiffusionUpscalePipeline",), what=what)
        dtype = resolve_dtype(cfg, resolve_device(cfg))
        kw = {"field": "model", "torch_dtype": dtype}
        return cls(
            vae=load_component(AutoencoderKL, source, subfolder="vae", **kw),
            text_encoder=load_component(CLIPTextModel, source, subfolder="text_encoder", **kw),
            tokenizer=load_component(CLIPTokenizer, source, field="model", subfolder="tokenizer"),
            unet=load_component(UNet2DConditionModel, source, subfolder="unet", **kw),
            scheduler=load_scheduler(source, field="model", subfolder="scheduler"),
            low_res_scheduler=load_scheduler(
                source, field="model", subfolder="low_res_scheduler", cls=DDPMScheduler
            ),
            cfg=cfg,
        )

    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(prompt, self._device, 1, False)
        return (embeds.to(self._dtype),)

    def _noised_lr(self, lr: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """lr [B, 3, h, w] in [0, 1] → (LR in [-1, 1] noised to NOISE_LEVEL, [B] noise levels)."""
        from diffusers.utils.torch_utils import randn_tensor

        image = (2 * lr - 1).to(self._device, self._dtype)
        level = torch.full((lr.shape[0],), NOISE_LEVEL, dtype=torch.long, device=self._device)
        noise = randn_tensor(image.shape, generator=generator, device=self._device, dtype=self._dtype)
        return self._low_res.add_noise(image, noise, level), level

    def _denoise(self, latents, image, t, text, level, unet) -> torch.Tensor:
        with autocast(self._device, self._dtype):
            x = torch.cat([latents, image], dim=1)
            return unet(x, t, encoder_hidden_states=text, class_labels=level, return_dict=False)[0]

    @torch.no_grad()
    def sample(
        self, lr: torch.Tensor, seeds: Sequence[int], prompts: Sequence[str] | None = None
    ) -> torch.Tensor:
        """lr [B, 3, h, w] in [0, 1] → SR [B, 3, 4h, 4w] float32 in [0, 1] on the CPU; row i depends only on seeds[i].

        Per row, the LR noise is drawn before the initial latents, from the same generator, as in the pipeline.
        """
        from diffusers.utils.torch_utils import randn_tensor

        check_lr(lr, 1, 1)
        batch = lr.shape[0]
        generators = row_generators(seeds, batch)
        (text,) = self._text(row_prompts(prompts, self.cfg.prompt, batch))
        image, level = self._noised_lr(lr, generators)
        guided = self.guidance_scale > 1
        if guided:
            (negative,) = self._text([self.negative_prompt] * batch)
            text, image, level = (
                torch.cat([negative, text]),
                torch.cat([image, image]),
                torch.cat([level, level]),
            )
        shape = (batch, self.vae.config.latent_channels, *lr.shape[-2:])
        latents = randn_tensor(shape, generator=generators, device=self._device, dtype=self._dtype)
        latents = latents * self._sampler.init_noise_sigma
        self._sampler.set_timesteps(self.num_inference_steps, device=self._device)
        step_kwargs = {k: v for k, v in (("eta", 0.0), ("generator", generators)) if k in self._step_kwargs}
        for t in self._sampler.timesteps:
            stopping.check()  # once per denoising step
            x = torch.cat([latents, latents]) if guided else latents
            x = self._sampler.scale_model_input(x, t)
            pred = self._denoise(x, image, t, text, level, self._unet_fwd)
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + self.guidance_scale * (cond - uncond)
            latents = self._sampler.step(pred, t, latents, **step_kwargs, return_dict=False)[0].to(
                self._dtype
            )
        latents = latents.to(self._vae_dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        self.pipeline.maybe_free_model_hooks()  # with cpu_offload: hand the GPU back between calls
        return (image.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def make_noised_batch(
        self,
        target: torch.Tensor,
        lr: torch.Tensor,
        generator: torch.Generator,
        prompts: Sequence[str] | None = None,
        t_range: tuple[float, float] = (0.0, 1.0),
    ) -> NoisedBatch:
        """target [B, 3, 4h, 4w] in [0, 1] → VAE latents [B, 4, h, w]; t uniform over `t_range` of the steps; LR noised."""
        from diffusers.utils.torch_utils import randn_tensor

        check_lr(lr, 1, 1)
        check_target(target, lr, self.scale)
        batch = target.shape[0]
        pixels = (2 * target - 1).to(self._device, self._vae_dtype)
        posterior = self.vae.encode(pixels).latent_dist
        x0 = (posterior.sample(generator=generator) * self.vae.config.scaling_factor).float()
        noise = randn_tensor(x0.shape, generator=generator, device=self._device, dtype=torch.float32)
        t = draw_timesteps(batch, self._noiser.config.num_train_timesteps, t_range, generator)
        image, level = self._noised_lr(lr, _content_generators(lr, generator))
        (text,) = self._text(row_prompts(prompts, self.cfg.prompt, batch))
        cond = UpscalerCondition(image=image, noise_level=level, text=text)
        return NoisedBatch(x0=x0, noise=noise, t=t.to(self._device), cond=cond)

    def prediction_errors(self, batch: NoisedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self._noiser.add_noise(batch.x0, batch.noise, batch.t).to(self._dtype)
        if self.prediction_type == "v_prediction":
            target = self._noiser.get_velocity(batch.x0, batch.noise, batch.t)
        else:
            target = batch.noise
        c: UpscalerCondition = batch.cond
        pred = self._denoise(noisy, c.image, batch.t, c.text, c.noise_level, self._trainable.policy)
        with self._trainable.as_reference() as reference:
            ref = self._denoise(noisy, c.image, batch.t, c.text, c.noise_level, reference)
        return per_sample_mse(pred, target), per_sample_mse(ref, target)
