"""The built-in tiny Real-ISR model: a pixel-space conditional diffusion UNet (×4) that trains and samples on a CPU.

It is the embedded default backend, so the whole pipeline (sample → score → pairs → DPO) runs without any
download. The network is a diffusers `UNet2DModel` that sees 6 channels — the noisy sample and the bicubic
upsampling of the LR image — and predicts ε. Training noise follows a 1000-step DDPM schedule; sampling uses
DDIM with eta=0, so a candidate is a deterministic function of its LR and its seed's initial noise.

The design choice a reader would miss: the diffusion runs on the *residual* `hr − bicubic(lr)` (in [-1, 1]
units), not on the HR pixels. A model this small, pretrained for minutes on a CPU, cannot afford to learn to
reproduce the low frequencies it is given; on the residual it spends all its capacity on the detail that
makes candidates differ. Outputs are `clamp(bicubic(lr) + residual)`, and the sampler clips its x₀ (residual)
estimate to ±`residual_clip` at every step (see `__init__` for why).

Sizes: the UNet halves the resolution `len(block_out_channels) − 1` times, so the HR size must be a multiple
of that factor. Other sizes are reflect-padded on the bottom/right before denoising and cropped afterwards;
padding happens on the bicubic conditioning and on the noise, so results do not depend on batch composition.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from dp2o import stopping
from dp2o.devices import resolve_device
from dp2o.models.base import Backend, BackendError, NoisedBatch, draw_timesteps
from dp2o.models.config import BackendConfig

#: file at the top of a tiny-sr folder that marks it and records what the UNet folder alone does not say
TINY_META_FILE = "tiny_sr.json"
UNET_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
DEFAULT_NUM_INFERENCE_STEPS = 20
#: bound on the predicted residual at every DDIM step, in [-1, 1] units (0.25 ≈ 32/255 per pixel)
DEFAULT_RESIDUAL_CLIP = 0.25
NUM_TRAIN_TIMESTEPS = 1000

#: the architecture of the bundled weights: ~3.1 M parameters, attention only at 1/8 resolution
DEFAULT_UNET_CONFIG: dict = {
    "in_channels": 6,
    "out_channels": 3,
    "block_out_channels": (32, 64, 64, 128),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}


def bundled_weights_dir() -> Path:
    """The folder of the pretrained tiny-sr weights shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "weights" / "tiny-sr"


def _to_signed(img: torch.Tensor) -> torch.Tensor:
    return img * 2.0 - 1.0


class TinyBackend(Backend):
    """Pixel-space conditional DDPM/DDIM super-resolution model (×4), trained in full (no LoRA)."""

    name = "tiny"
    prediction_type = "epsilon"
    scale = 4

    def __init__(
        self,
        unet: UNet2DModel,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        device: str | torch.device = "cpu",
        residual_clip: float = DEFAULT_RESIDUAL_CLIP,
    ):
        if unet.config.in_channels != 6 or unet.config.out_channels != 3:
            raise BackendError(
                f"tiny UNet must have in_channels=6 (noisy residual + bicubic LR) and out_channels=3, got "
                f"{unet.config.in_channels} and {unet.config.out_channels}; build it from DEFAULT_UNET_CONFIG"
            )
        self._device = resolve_device(device)
        self.unet = unet.to(self._device)
        self.reference = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.num_inference_steps = int(num_inference_steps)
        self.residual_clip = float(residual_clip)
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", prediction_type="epsilon"
        )
        # "trailing" spacing makes the first DDIM step start at t=999, where the training distribution is
        # pure noise; the default "leading" spacing would start at a partly-clean timestep it never sees.
        # Clipping the predicted residual matters: at t≈999 the x₀ estimate divides the ε error by
        # sqrt(ᾱ) ≈ 0.006, and unclipped, those errors become whole-image colour casts that later steps keep.
        self.sampler = DDIMScheduler.from_config(
            self.noise_scheduler.config,
            timestep_spacing="trailing",
            clip_sample=True,
            clip_sample_range=self.residual_clip,
            set_alpha_to_one=True,
        )
        self.factor = 2 ** (len(unet.config.block_out_channels) - 1)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_random(
        cls,
        seed: int = 0,
        unet_config: dict | None = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        device: str | torch.device = "cpu",
    ) -> TinyBackend:
        """A freshly initialised model (default architecture unless `unet_config` overrides it)."""
        torch.manual_seed(seed)
        unet = UNet2DModel(**{**DEFAULT_UNET_CONFIG, **(unet_config or {})})
        return cls(unet, num_inference_steps=num_inference_steps, device=device)

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> TinyBackend:
        """Build from a `BackendConfig`: `cfg.model` None loads the bundled weights, else a folder or hub id."""
        backend = cls.from_pretrained(
            cfg.model if cfg.model is not None else bundled_weights_dir(), cfg.device
        )
        if cfg.num_inference_steps is not None:
            backend.num_inference_steps = cfg.num_inference_steps
        return backend

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str | torch.device = "cpu") -> TinyBackend:
        """Load a folder written by `save_pretrained`/`save_trainable` (or the same layout on the hub)."""
        source = str(path_or_id)
        local = Path(source)
        try:
            if local.is_dir():
                meta_path = local / TINY_META_FILE
                meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            elif local.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
                raise FileNotFoundError(f"{source} is not a folder")
            else:
                from huggingface_hub import hf_hub_download

                meta = json.loads(Path(hf_hub_download(source, TINY_META_FILE)).read_text())
            unet = UNet2DModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise BackendError(
                f"BackendConfig.model={source!r} is not a tiny-sr model ({type(exc).__name__}: {exc}). Set `model` "
                f"to a folder written by TinyBackend.save_pretrained or `python -m scripts.pretrain_tiny` (it holds "
                f"unet/config.json and unet/{UNET_WEIGHTS_FILE}), or leave it unset for the bundled weights."
            ) from exc
        return cls(
            unet,
            num_inference_steps=meta.get("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS),
            device=device,
            residual_clip=meta.get("residual_clip", DEFAULT_RESIDUAL_CLIP),
        )

    def save_pretrained(self, folder: str | Path, half_precision: bool = False) -> None:
        """Write the policy as a diffusers folder (`unet/` + `tiny_sr.json`) that `from_pretrained` loads.

        half_precision stores float16 weights (half the size; loaded back as float32) — used for the bundled
        weights, whose size is capped.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = torch.float16 if half_precision else torch.float32
        self.unet.save_config(folder / "unet")
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.unet.state_dict().items()}
        save_file(state, str(folder / "unet" / UNET_WEIGHTS_FILE))
        meta = {
            "backend": self.name,
            "scale": self.scale,
            "working_space": "residual over bicubic upsampling, [-1, 1] units",
            "num_inference_steps": self.num_inference_steps,
            "residual_clip": self.residual_clip,
            "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        }
        (folder / TINY_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    # ---- shared helpers -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def _check_images(self, name: str, img: torch.Tensor) -> None:
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"{name} must be [B, 3, H, W], got shape {tuple(img.shape)}")
        if not img.is_floating_point():
            raise ValueError(
                f"{name} must be float in [0, 1], got dtype {img.dtype}; divide uint8 images by 255"
            )

    def _bicubic_up(self, lr: torch.Tensor) -> torch.Tensor:
        """lr [B, 3, h, w] float in [0, 1] → [B, 3, 4h, 4w] in [-1, 1] (not clamped: overshoot is information)."""
        up = F.interpolate(lr.to(self._device, torch.float32), scale_factor=self.scale, mode="bicubic")
        return _to_signed(up)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.factor, (-w) % self.factor
        return F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x

    def _eps(self, unet: UNet2DModel, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, w = x_t.shape[-2:]
        inp = self._pad(torch.cat([x_t, cond], dim=1))
        return unet(inp, t).sample[..., :h, :w]

    # ---- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        lr: torch.Tensor,
        seeds: Sequence[int],
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """SR images for rows of (LR, seed); `prompts` is ignored (the model is unconditional on text).

        lr: [B, 3, h, w] float in [0, 1]; seeds: B ints. Returns [B, 3, 4h, 4w] float in [0, 1] on the CPU.
        Row i's initial noise is drawn from a CPU generator seeded with seeds[i] alone, and DDIM (eta=0) adds
        no further noise, so a row regenerated alone reproduces the batched result.
        """
        self._check_images("lr", lr)
        if len(seeds) != lr.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for {lr.shape[0]} LR rows; pass one seed per row")
        cond = self._bicubic_up(lr)
        shape = cond.shape[1:]
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(self._device)
        # a fresh scheduler per call: its step state is mutable, and residual_clip may have been changed
        sampler = DDIMScheduler.from_config(self.sampler.config, clip_sample_range=self.residual_clip)
        sampler.set_timesteps(self.num_inference_steps, device=self._device)
        x = noise
        for t in sampler.timesteps:
            stopping.check()  # once per denoising step: a stop request ends a long batch within a step
            eps = self._eps(self.unet, x, cond, t.expand(x.shape[0]))
            x = sampler.step(eps, t, x, eta=0.0).prev_sample
        return ((cond + x).clamp(-1, 1) * 0.5 + 0.5).cpu()

    # ---- training -------------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return self.unet.parameters()

    def make_noised_batch(
        self,
        target: torch.Tensor,
        lr: torch.Tensor,
        generator: torch.Generator,
        prompts: Sequence[str] | None = None,
        t_range: tuple[float, float] = (0.0, 1.0),
    ) -> NoisedBatch:
        """target [B, 3, 4h, 4w] and lr [B, 3, h, w], float in [0, 1]; t ~ U{0..999}, noise ~ N(0, 1), both
        drawn from `generator` (a CPU generator) so training does not depend on the device."""
        self._check_images("target", target)
        self._check_images("lr", lr)
        if target.shape[0] != lr.shape[0] or target.shape[-2:] != (
            lr.shape[-2] * self.scale,
            lr.shape[-1] * self.scale,
        ):
            raise ValueError(
                f"target {tuple(target.shape)} must be lr {tuple(lr.shape)} upscaled ×{self.scale} with the same batch"
            )
        cond = self._bicubic_up(lr)
        x0 = _to_signed(target.to(self._device, torch.float32)) - cond
        t = draw_timesteps(x0.shape[0], NUM_TRAIN_TIMESTEPS, t_range, generator)
        noise = torch.randn(x0.shape, generator=generator)
        return NoisedBatch(x0=x0, noise=noise.to(self._device), t=t.to(self._device), cond=cond)

    def policy_errors(self, batch: NoisedBatch) -> torch.Tensor:
        """Per-sample ε-prediction MSE of the policy alone, [B] (the pretraining loss; no reference pass)."""
        x_t = self.noise_scheduler.add_noise(batch.x0, batch.noise, batch.t)
        return (self._eps(self.unet, x_t, batch.cond, batch.t) - batch.noise).pow(2).mean(dim=(1, 2, 3))

    def prediction_errors(self, batch: NoisedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x_t = self.noise_scheduler.add_noise(batch.x0, batch.noise, batch.t)
        err_policy = (self._eps(self.unet, x_t, batch.cond, batch.t) - batch.noise).pow(2).mean(dim=(1, 2, 3))
        with torch.no_grad():
            eps_ref = self._eps(self.reference, x_t, batch.cond, batch.t)
        err_ref = (eps_ref - batch.noise).pow(2).mean(dim=(1, 2, 3))
        return err_policy, err_ref

    def save_trainable(self, folder: str | Path) -> None:
        self.save_pretrained(folder)

    def load_trainable(self, folder: str | Path) -> None:
        path = Path(folder) / "unet" / UNET_WEIGHTS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; pass a folder written by TinyBackend.save_trainable")
        state = load_file(str(path), device=str(self._device))
        self.unet.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})

    def train(self) -> None:
        self.unet.train()

    def eval(self) -> None:
        self.unet.eval()
