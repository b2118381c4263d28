"""Score in-memory candidate images and turn them into rewards on a frozen scale, for evaluation.

The score stage works on shards; evaluation scripts (the mini reproduction, the tiny model's check against
bicubic) hold a few hundred candidates in memory and need a table per method. `RewardModel` wraps
`dp2o.reward` for that.

The design choice a reader would miss: the normalisation bounds are fitted by the first `reward` call and
frozen for every later one. Comparing methods needs one fixed scale: re-fitting per method would map each
method's own spread onto [0, 1], and a method that only narrowed its spread would change its reward for
that reason alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from dp2o.reward.hybrid import RewardConfig, compute_reward
from dp2o.reward.registry import resolve_metrics
from dp2o.reward.scoring import MetricScorer


class RewardModel:
    """IQA metrics plus the hybrid reward with normalisation bounds fitted once, then frozen."""

    def __init__(
        self,
        metrics: str | Sequence[str] = "offline",
        reward: RewardConfig | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 16,
    ):
        self.specs = resolve_metrics(metrics)
        self.scorer = MetricScorer(self.specs, device=device, batch_size=batch_size)
        self.cfg = reward or RewardConfig()
        if self.cfg.normalization != "dataset":
            raise ValueError(
                "RewardModel needs RewardConfig(normalization='dataset'): group bounds cannot be frozen"
            )
        self.bounds: dict | None = None

    @property
    def metric_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def raw(self, sample_ids: Sequence[str], candidates: torch.Tensor, hr: torch.Tensor) -> pa.Table:
        """Raw metric scores, one row per (input, candidate).

        candidates: float [n, m, 3, H, W] in [0, 1], m candidates of each of the n inputs
        hr:         [n, 3, H, W], uint8 in [0, 255] or float in [0, 1], the reference of each input
        Returns columns `sample_id`, `candidate` (0..m-1) and one float column per metric.
        """
        n, m = candidates.shape[:2]
        if len(sample_ids) != n or hr.shape[0] != n or hr.shape[1:] != candidates.shape[2:]:
            raise ValueError(
                f"RewardModel.raw: {len(sample_ids)} ids, candidates {tuple(candidates.shape)} and hr "
                f"{tuple(hr.shape)} disagree; need n ids, [n, m, 3, H, W] candidates and [n, 3, H, W] hr"
            )
        ref = hr.float() / 255 if hr.dtype == torch.uint8 else hr.float()
        scores = self.scorer.score(
            candidates.reshape(n * m, *candidates.shape[2:]),
            ref[:, None].expand(-1, m, -1, -1, -1).reshape(n * m, *ref.shape[1:]),
        )
        columns = {
            "sample_id": np.repeat(np.asarray(list(sample_ids), dtype=object), m),
            "candidate": np.tile(np.arange(m, dtype=np.int64), n),
            **scores,
        }
        return pa.table(columns)

    def reward(self, raw: pa.Table) -> pa.Table:
        """`raw` plus a float64 `reward` column in [0, 1]; the first call fixes the bounds for all later ones."""
        reward, bounds = compute_reward(raw, self.specs, self.cfg, bounds=self.bounds)
        if self.bounds is None:
            self.bounds = bounds
        return raw.append_column("reward", pa.array(np.asarray(reward, dtype=np.float64)))
