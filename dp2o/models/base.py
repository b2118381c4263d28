"""The interface every Real-ISR backend implements, so the sample and train stages never see model details.

A backend wraps one generator (a diffusion or flow model conditioned on a low-resolution image) and a frozen
reference copy of its trainable part. Sampling is batched over (LR, seed) pairs; training asks only for the
per-sample prediction errors of the policy and of the reference on the *same* noised inputs, which is all the
DPO losses in `dp2o.train.losses` need. Keeping the loss out of the backend means one loss implementation is
tested once and serves every model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dp2o.errors import Dp2oError


class BackendError(Dp2oError, ValueError):
    """A backend could not be built from its config; the message names the config field and the fix."""


@dataclass(frozen=True)
class NoisedBatch:
    """What a training step needs for one batch: targets, noise and timesteps, all on the backend's device.

    x0:     clean targets in the model's working space (pixels in [-1, 1] or VAE latents), [B, C, H, W]
    noise:  Gaussian noise of the same shape
    t:      timesteps, [B]; integers for DDPM-style models, floats in [0, 1] (sigmas) for flow models
    cond:   backend-specific conditioning (e.g. the LR image, prompt embeddings), opaque to the caller
    """

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    cond: object


class Backend(ABC):
    """A Real-ISR generator with a frozen reference, behind the interface the stages use.

    Images cross this interface as float tensors [B, 3, H, W] in [0, 1] (RGB). LR inputs are h×w; outputs are
    (scale·h)×(scale·w).
    """

    #: short name recorded in the `backend` column of the sample stage
    name: str = "base"
    #: what the network predicts: "epsilon", "v_prediction" (DDPM family) or "flow" (velocity ε − x₀)
    prediction_type: str = "epsilon"
    #: upscaling factor from LR to output
    scale: int = 4

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    # ---- sampling -------------------------------------------------------------------------------------
    @abstractmethod
    def sample(
        self,
        lr: torch.Tensor,
        seeds: Sequence[int],
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Generate one SR image per row.

        lr:     [B, 3, h, w] float in [0, 1]; rows may repeat the same LR with different seeds
        seeds:  B integers; row i's initial noise (and any sampler noise) comes only from seeds[i], so a row
                regenerated alone with the same seed gives the same image (within float tolerance)
        prompts: B strings or None for the backend's default prompt
        returns [B, 3, scale·h, scale·w] float in [0, 1] on the CPU
        """

    # ---- training -------------------------------------------------------------------------------------
    @abstractmethod
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """Parameters the optimiser updates (the ControlNet, LoRA adapters, or the whole tiny model)."""

    @abstractmethod
    def make_noised_batch(
        self,
        target: torch.Tensor,
        lr: torch.Tensor,
        generator: torch.Generator,
        prompts: Sequence[str] | None = None,
        t_range: tuple[float, float] = (0.0, 1.0),
    ) -> NoisedBatch:
        """Encode targets and conditions and draw (t, noise) for a batch.

        target: [B, 3, H, W] float in [0, 1], the candidate images (winners and losers)
        lr:     [B, 3, h, w] float in [0, 1]
        generator: CPU generator that supplies every random draw, so training is reproducible
        t_range: the fractions (lo, hi) of the noise schedule that t is drawn from (`train.timestep_range`);
            (0, 1) draws exactly as the backend's pretraining does; use `draw_timesteps` for DDPM schedules
        The caller makes winner and loser share t and noise by drawing for the winners and repeating.
        """

    @abstractmethod
    def prediction_errors(self, batch: NoisedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample mean squared prediction error of the policy and of the frozen reference.

        Returns (err_policy [B], err_ref [B]), each the mean over C, H, W of ‖target − prediction‖², where the
        target is ε, v or the flow velocity according to `prediction_type`. err_policy carries gradients to
        `trainable_parameters()`; err_ref does not.
        """

    @abstractmethod
    def save_trainable(self, folder: str | Path) -> None:
        """Write the trainable weights (safetensors) so `load_trainable` or `from_pretrained` can restore them."""

    @abstractmethod
    def load_trainable(self, folder: str | Path) -> None:
        """Load weights written by `save_trainable` into the policy (the reference stays as it was)."""

    def train(self) -> None:  # noqa: B027 - optional hook
        """Put the policy in training mode (the reference always stays in eval mode)."""

    def eval(self) -> None:  # noqa: B027 - optional hook
        """Put the policy in eval mode."""


def draw_timesteps(
    batch: int, num_train_timesteps: int, t_range: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Integer DDPM timesteps, uniform over the fractions `t_range` = (lo, hi) of the schedule: t ∈ [⌊lo·T⌋, ⌈hi·T⌉).
    (0, 1) is `randint(0, T)`, the same draw as before this option existed."""
    lo = int(t_range[0] * num_train_timesteps)
    hi = max(lo + 1, math.ceil(t_range[1] * num_train_timesteps))
    return torch.randint(lo, hi, (batch,), generator=generator)
