"""The null backend: deterministic SR images with no model, for measuring the orchestration alone.

`sample` upsamples the LR input (nearest) and adds a small per-seed offset, so candidates are distinct,
deterministic and cheap: a run with this backend times planning, scheduling, PNG coding and commits, not
denoising (benchmarks/orchestration_overhead.py). It cannot be trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from dp2o.models.base import Backend, BackendError, NoisedBatch
from dp2o.models.config import BackendConfig


class NullBackend(Backend):
    name = "null"
    scale = 4

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> NullBackend:
        return cls()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def sample(
        self, lr: torch.Tensor, seeds: Sequence[int], prompts: Sequence[str] | None = None
    ) -> torch.Tensor:
        if lr.ndim != 4 or lr.shape[1] != 3 or lr.shape[0] != len(seeds):
            raise ValueError(
                f"null backend: lr must be [B, 3, h, w] with B={len(seeds)} seeds, got {tuple(lr.shape)}"
            )
        up = lr.float().repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)
        offset = torch.tensor([(s % 17) / 255.0 for s in seeds]).view(-1, 1, 1, 1)
        return (up + offset).clamp(0, 1)

    def _cannot_train(self, *_args, **_kwargs):
        raise BackendError("the null backend has no model to train (it exists to time the orchestration)")

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return self._cannot_train()

    def make_noised_batch(self, *args, **kwargs) -> NoisedBatch:
        return self._cannot_train()

    def prediction_errors(self, batch: NoisedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cannot_train()

    def save_trainable(self, folder: str | Path) -> None:
        self._cannot_train()

    def load_trainable(self, folder: str | Path) -> None:
        self._cannot_train()
