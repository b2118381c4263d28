"""C-FLUX: FLUX.1 (rectified flow) plus a FluxControlNetModel that sees the VAE latents of the upsampled LR.

Sampling is Euler (FlowMatchEulerDiscreteScheduler, with FLUX's resolution-dependent shift) for 25 steps with
distilled guidance 2.5 fed to the guidance embedding (FLUX.1-dev has no true CFG pass). Training trains only
the ControlNet (4 double-stream blocks when created fresh) against the velocity v = ε − x₀ at
x_σ = (1 − σ)·x₀ + σ·ε.

Design choice: the training σ is drawn logit-normal (σ = sigmoid(n), n ~ N(0, 1), the SD3 paper's default)
and then passed through the same resolution shift the sampler applies to its σ grid, so training effort
lands where sampling spends its steps at this image size. As for C-SD2, sampling is our own batched loop
around the diffusers components, with one generator per row (VAE posterior sample of the control image
first, then the initial latents, as the pipeline draws them); a test checks it reproduces the pipeline.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

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
from dp2o.models.base import BackendError, NoisedBatch
from dp2o.models.config import BackendConfig
from dp2o.train.losses import per_sample_mse

log = logging.getLogger(__name__)

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 2.5
#: double-stream blocks of a fresh ControlNet (DP²O-SR's C-FLUX)
DEFAULT_CONTROLNET_LAYERS = 4
#: T5 tokens per prompt (the FLUX pipelines' default)
MAX_SEQUENCE_LENGTH = 512
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_PIPELINES = ("FluxPipeline", "FluxControlNetPipeline")


@dataclass(frozen=True)
class FluxCondition:
    """control: packed control latents [B, N, 4C]; text: [B, L, D]; pooled: [B, P]."""

    control: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def load_flux_controlnet(source: str | None, transformer, dtype: torch.dtype) -> FluxControlNetModel:
    """FluxControlNetModel from a folder/hub id, a single .safetensors state dict, or fresh from the base.

    A fresh or single-file ControlNet takes the base transformer's dimensions; the file's block counts are
    read off its keys and every key must match.
    """

    def from_base(layers: int, single_layers: int, copy_weights: bool) -> FluxControlNetModel:
        cfg = transformer.config
        return FluxControlNetModel.from_transformer(
            transformer,
            num_layers=layers,
            num_single_layers=single_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            load_weights_from_transformer=copy_weights,
        )

    if source is None:
        log.warning(
            "`controlnet` is not set: creating a fresh %d-block ControlNet from FLUX",
            DEFAULT_CONTROLNET_LAYERS,
        )
        controlnet = from_base(DEFAULT_CONTROLNET_LAYERS, 0, True)
    elif source.endswith(".safetensors"):
        from safetensors.torch import load_file

        path = Path(source).expanduser()
        if not path.is_file():
            raise BackendError(
                f"`controlnet`: file {source!r} does not exist; give the ControlNet .safetensors path"
            )
        state = load_file(str(path))
        layers = _count_blocks(state, "transformer_blocks")
        if layers == 0:
            raise BackendError(
                f"`controlnet`: {path} has no transformer_blocks.*; it is not a FluxControlNetModel"
            )
        controlnet = from_base(layers, _count_blocks(state, "single_transformer_blocks"), False)
        missing, unexpected = controlnet.load_state_dict(state, strict=False)
        check_keys(missing, unexpected, path)
    else:
        source = check_source(source, "controlnet", "a diffusers FluxControlNetModel")
        subfolder = "controlnet" if (Path(source) / "controlnet" / "config.json").is_file() else None
        controlnet = load_component(
            FluxControlNetModel, source, field="controlnet", subfolder=subfolder, torch_dtype=dtype
        )
    if controlnet.input_hint_block is not None:
        raise BackendError(
            "`controlnet`: this FluxControlNetModel has an input_hint_block (pixel-space control, XLabs style); "
            "C-FLUX feeds VAE latents of the LR, so use an InstantX-style ControlNet without one"
        )
    return controlnet.to(dtype)


class FluxControlNetBackend(DiffusersBackend):
    """C-FLUX behind the `Backend` interface. Build with `from_config`."""

    name = "flux-controlnet"
    prediction_type = "flow"
    scale = 4

    def __init__(self, *, components: dict, controlnet: FluxControlNetModel, cfg: BackendConfig):
        self._device = resolve_device(cfg)
        self._dtype = resolve_dtype(cfg, self._device)
        self.cfg = cfg
        self.num_inference_steps = cfg.num_inference_steps or DEFAULT_STEPS
        self.guidance_scale = DEFAULT_GUIDANCE if cfg.guidance_scale is None else cfg.guidance_scale
        self.transformer, self.vae = components["transformer"], components["vae"]
        for frozen in (self.transformer, self.vae, components["text_encoder"], components["text_encoder_2"]):
            frozen.requires_grad_(False).eval()
        self._trainable = TrainableModule(controlnet, lora_rank=cfg.lora_rank, lora_targets=LORA_TARGETS)
        self.controlnet = controlnet
        self.pipeline = FluxControlNetPipeline(controlnet=controlnet, **components)
        self.pipeline.set_progress_bar_config(disable=True)
        if cfg.cpu_offload and self._device.type != "cpu":
            self.pipeline.enable_model_cpu_offload(device=self._device)
        else:
            self.pipeline.to(self._device)
        configure_memory(self.vae, cfg)
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
            controlnet.enable_gradient_checkpointing()
        self._sampler: FlowMatchEulerDiscreteScheduler = components["scheduler"]
        self._vae_scale = self.pipeline.vae_scale_factor
        self._transformer_fwd = torch.compile(self.transformer) if cfg.compile else self.transformer
        self._controlnet_fwd = torch.compile(controlnet) if cfg.compile else controlnet
        self._step_kwargs = set(inspect.signature(self._sampler.step).parameters)
        self._text = PromptCache(self._encode_prompt)

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> FluxControlNetBackend:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        what = "FLUX.1 (diffusers layout, e.g. black-forest-labs/FLUX.1-dev)"
        source = check_source(cfg.model, "model", what)
        check_pipeline_class(source, field="model", allowed=_PIPELINES, what=what)
        dtype = resolve_dtype(cfg, resolve_device(cfg))
        kw = {"field": "model", "torch_dtype": dtype}
        components = {
            "transformer": load_component(FluxTransformer2DModel, source, subfolder="transformer", **kw),
            "vae": load_component(AutoencoderKL, source, subfolder="vae", **kw),
            "text_encoder": load_component(CLIPTextModel, source, subfolder="text_encoder", **kw),
            "tokenizer": load_component(CLIPTokenizer, source, field="model", subfolder="tokenizer"),
            "text_encoder_2": load_component(T5EncoderModel, source, subfolder="text_encoder_2", **kw),
            "tokenizer_2": load_component(T5TokenizerFast, source, field="model", subfolder="tokenizer_2"),
            "scheduler": load_scheduler(
                source, field="model", subfolder="scheduler", cls=FlowMatchEulerDiscreteScheduler
            ),
        }
        controlnet = load_flux_controlnet(cfg.controlnet, components["transformer"], dtype)
        return cls(components=components, controlnet=controlnet, cfg=cfg)

    # ---- shared pieces ----------------------------------------------------------------------------------
    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompt, prompt_2=None, device=self._device, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        return embeds.to(self._dtype), pooled.to(self._dtype)

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        return 2 * (height // (self._vae_scale * 2)), 2 * (width // (self._vae_scale * 2))

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return FluxControlNetPipeline._pack_latents(latents, b, c, h, w)

    def _encode_control(self, lr: torch.Tensor, generator) -> torch.Tensor:
        """lr [B, 3, h, w] in [0, 1] → packed VAE latents of its ×4 bicubic upsample.

        With generators (sampling) a posterior sample, as the pipeline draws it; with None (training) the
        posterior mean, so a winner and its loser, which share the LR, see exactly the same condition.
        """
        pixels = (2 * upsample(lr, self.scale) - 1).to(self._device, self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mode() if generator is None else posterior.sample(generator=generator)
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return self._pack(latents.to(self._dtype))

    def _shift_mu(self, tokens: int) -> float:
        c = self._sampler.config
        return calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)

    def _velocity(
        self, latents, sigma, cond: FluxCondition, img_ids, txt_ids, transformer, controlnet
    ) -> torch.Tensor:
        """latents: packed [B, N, 4C]; sigma: [B] in [0, 1] → predicted velocity, packed like latents."""
        guidance = torch.full_like(sigma, self.guidance_scale, dtype=torch.float32)
        common = {
            "timestep": sigma.to(latents.dtype),
            "pooled_projections": cond.pooled,
            "encoder_hidden_states": cond.text,
            "txt_ids": txt_ids,
            "img_ids": img_ids,
            "return_dict": False,
        }
        with autocast(self._device, self._dtype):
            blocks, single = controlnet(
                hidden_states=latents,
                controlnet_cond=cond.control,
                guidance=guidance if controlnet.config.guidance_embeds else None,
                **common,
            )
            return transformer(
                hidden_states=latents,
                guidance=guidance if self.transformer.config.guidance_embeds else None,
                controlnet_block_samples=blocks,
                controlnet_single_block_samples=single,
                controlnet_blocks_repeat=False,
                **common,
            )[0]

    def _ids(self, batch: int, height: int, width: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self._latent_size(height, width)
        img_ids = FluxControlNetPipeline._prepare_latent_image_ids(
            batch, h // 2, w // 2, self._device, self._dtype
        )
        return img_ids, torch.zeros(text_len, 3, device=self._device, dtype=self._dtype)

    # ---- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, lr: torch.Tensor, seeds: Sequence[int], prompts: Sequence[str] | None = None
    ) -> torch.Tensor:
        """lr [B, 3, h, w] in [0, 1] → SR [B, 3, 4h, 4w] float32 in [0, 1] on the CPU; row i depends only on seeds[i]."""
        from diffusers.utils.torch_utils import randn_tensor

        check_lr(lr, 2 * self._vae_scale, self.scale)
        batch = lr.shape[0]
        height, width = self.scale * lr.shape[-2], self.scale * lr.shape[-1]
        generators = row_generators(seeds, batch)
        text, pooled = self._text(row_prompts(prompts, self.cfg.prompt, batch))
        cond = FluxCondition(control=self._encode_control(lr, generators), text=text, pooled=pooled)
        h, w = self._latent_size(height, width)
        channels = self.transformer.config.in_channels // 4
        latents = self._pack(
            randn_tensor(
                (batch, channels, h, w), generator=generators, device=self._device, dtype=self._dtype
            )
        )
        img_ids, txt_ids = self._ids(batch, height, width, text.shape[1])
        sigmas = np.linspace(1.0, 1 / self.num_inference_steps, self.num_inference_steps)
        timesteps, _ = retrieve_timesteps(
            self._sampler,
            self.num_inference_steps,
            self._device,
            sigmas=sigmas,
            mu=self._shift_mu(latents.shape[1]),
        )
        step_kwargs = {"generator": generators} if "generator" in self._step_kwargs else {}
        for t in timesteps:
            stopping.check()  # once per denoising step
            sigma = (t / 1000).expand(batch)
            v = self._velocity(
                latents, sigma, cond, img_ids, txt_ids, self._transformer_fwd, self._controlnet_fwd
            )
            latents = self._sampler.step(v, t, latents, **step_kwargs, return_dict=False)[0].to(self._dtype)
        latents = FluxControlNetPipeline._unpack_latents(latents, height, width, self._vae_scale)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        self.pipeline.maybe_free_model_hooks()  # with cpu_offload: hand the GPU back between calls
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
        """target [B, 3, 4h, 4w] in [0, 1] → latents x₀ [B, C, H/8, W/8]; t = σ [B] (shifted logit-normal); ε."""
        from diffusers.utils.torch_utils import randn_tensor

        check_lr(lr, 2 * self._vae_scale, self.scale)
        check_target(target, lr, self.scale)
        batch = target.shape[0]
        pixels = (2 * target - 1).to(self._device, self.vae.dtype)
        x0 = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        x0 = ((x0 - self.vae.config.shift_factor) * self.vae.config.scaling_factor).float()
        noise = randn_tensor(x0.shape, generator=generator, device=self._device, dtype=torch.float32)
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))
        tokens = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)
        sigma = self._sampler.time_shift(self._shift_mu(tokens), 1.0, sigma).float()
        # train.timestep_range: the same density, squeezed affinely into [lo, hi] (σ is the noise fraction)
        sigma = t_range[0] + (t_range[1] - t_range[0]) * sigma
        text, pooled = self._text(row_prompts(prompts, self.cfg.prompt, batch))
        cond = FluxCondition(control=self._encode_control(lr, None), text=text, pooled=pooled)
        return NoisedBatch(x0=x0, noise=noise, t=sigma.to(self._device), cond=cond)

    def prediction_errors(self, batch: NoisedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = batch.t.view(-1, 1, 1, 1)
        noisy = self._pack(((1 - sigma) * batch.x0 + sigma * batch.noise).to(self._dtype))
        target = self._pack(batch.noise - batch.x0)
        cond: FluxCondition = batch.cond
        height, width = (s * self._vae_scale for s in batch.x0.shape[-2:])
        img_ids, txt_ids = self._ids(noisy.shape[0], height, width, cond.text.shape[1])
        pred = self._velocity(
            noisy, batch.t, cond, img_ids, txt_ids, self.transformer, self._trainable.policy
        )
        with self._trainable.as_reference() as reference:
            ref = self._velocity(noisy, batch.t, cond, img_ids, txt_ids, self.transformer, reference)
        return per_sample_mse(pred, target), per_sample_mse(ref, target)
