"""Raw IQA scores for batches of SR outputs against their HR images, through pyiqa.

`MetricScorer` builds every configured pyiqa metric once, up front, and refuses to start when weights are
missing (`MetricWeightsMissing`), so an offline worker fails in seconds instead of after its first shard.
Scores come back raw — in each metric's own units and direction — because the reward's normalisation and
weights are decided later, from the stored columns (`dp2o.reward.hybrid.compute_reward`).

The design choice a reader might miss: every metric call sees exactly `batch_size` images. Learned metrics
can give slightly different numbers for the same image in batches of different sizes (different kernels,
padding), so a short final chunk is padded with copies of its last image and the padding's scores are
dropped. A candidate's score then depends only on the images, the metric and the recorded batch size —
never on how a stage happened to split its shard.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from dp2o.devices import resolve_device
from dp2o.reward.registry import (
    MetricSpec,
    MetricWeightsMissing,
    missing_weights,
    missing_weights_message,
    resolve_metrics,
)


def _create(spec: MetricSpec, device: torch.device) -> torch.nn.Module:
    import pyiqa

    with warnings.catch_warnings():
        # pyiqa and its backbones warn about deprecated torchvision/timm arguments on every build
        warnings.simplefilter("ignore")
        try:
            shipped = [w.name for w in spec.weights if w.location == "dp2o"]
            if shipped:  # parameters that ship with dp2o (NIQE, BRISQUE): handed to pyiqa, never downloaded
                from dp2o.reward.classical import create_pyiqa_metric

                return create_pyiqa_metric(spec.pyiqa_name, shipped[0], device, as_loss=False)
            return pyiqa.create_metric(spec.pyiqa_name, device=device, as_loss=False)
        except Exception as err:
            # only a failure with files still absent is a weights problem; anything else is pyiqa's own error
            still_missing = missing_weights([spec])
            if not still_missing:
                raise
            raise MetricWeightsMissing(
                f"could not build metric {spec.name!r} (pyiqa {spec.pyiqa_name!r}): {type(err).__name__}: {err}\n"
                + missing_weights_message(still_missing)
            ) from err


class MetricScorer:
    """Scores SR images with a fixed list of IQA metrics.

    specs:      the metrics (see `dp2o.reward.registry.resolve_metrics`)
    device:     "cpu", "cuda", "cuda:1", ... or "auto"
    batch_size: images per metric call; part of the score's definition, so record it with the scores
    allow_download: let pyiqa fetch missing weights while building (needs internet); by default missing
                weights raise `MetricWeightsMissing` before anything is built
    """

    def __init__(
        self,
        specs: Sequence[MetricSpec],
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        allow_download: bool = False,
    ) -> None:
        if not specs:
            raise ValueError("MetricScorer needs at least one metric")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"metrics listed more than once: {names}")
        self.specs = list(specs)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        if not allow_download:
            missing = missing_weights(self.specs)
            if missing:
                raise MetricWeightsMissing(missing_weights_message(missing))
        self.metrics: dict[str, torch.nn.Module] = {s.name: _create(s, self.device) for s in self.specs}

    def _check(self, sr: torch.Tensor, hr: torch.Tensor) -> None:
        for label, x in (("sr", sr), ("hr", hr)):
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"{label} must be [B, 3, H, W], got shape {tuple(x.shape)}")
            if not x.is_floating_point():
                raise ValueError(f"{label} must be a float tensor in [0, 1], got dtype {x.dtype}")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"{label} values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; clamp or rescale"
                )
        if sr.shape != hr.shape:
            raise ValueError(f"sr shape {tuple(sr.shape)} differs from hr shape {tuple(hr.shape)}")
        h, w = sr.shape[-2:]
        for spec in self.specs:
            if min(h, w) < spec.min_side or h % spec.side_multiple or w % spec.side_multiple:
                raise ValueError(
                    f"metric {spec.name!r} needs height and width >= {spec.min_side} and multiples of "
                    f"{spec.side_multiple}; got {h}x{w}. Crop the HR images to a size that fits"
                )

    @torch.inference_mode()
    def score(self, sr: torch.Tensor, hr: torch.Tensor) -> dict[str, np.ndarray]:
        """Raw scores of each SR image against its HR image.

        sr, hr: [B, 3, H, W] float in [0, 1], RGB, same shape (hr is ignored by NR metrics but always
        required, so the score table has one shape). Returns {metric name: float64 [B]} in each metric's
        own units and direction (see `MetricSpec.lower_better`). Inputs are never modified: some pyiqa
        metrics normalise their input in place, so each one gets its own copy.
        """
        self._check(sr, hr)
        n = sr.shape[0]
        out = {s.name: np.empty(n, dtype=np.float64) for s in self.specs}
        for begin in range(0, n, self.batch_size):
            sr_chunk = sr[begin : begin + self.batch_size].float()
            hr_chunk = hr[begin : begin + self.batch_size].float()
            real = sr_chunk.shape[0]
            if real < self.batch_size:
                pad = self.batch_size - real
                sr_chunk = torch.cat([sr_chunk, sr_chunk[-1:].expand(pad, -1, -1, -1)])
                hr_chunk = torch.cat([hr_chunk, hr_chunk[-1:].expand(pad, -1, -1, -1)])
            sr_chunk, hr_chunk = sr_chunk.to(self.device), hr_chunk.to(self.device)
            for spec in self.specs:
                metric = self.metrics[spec.name]
                if spec.kind == "FR":
                    raw = metric(sr_chunk.clone(), hr_chunk.clone())
                else:
                    raw = metric(sr_chunk.clone())
                raw = torch.as_tensor(raw).detach().reshape(-1).double().cpu().numpy()
                if raw.shape[0] != self.batch_size:
                    raise RuntimeError(
                        f"metric {spec.name!r} returned {raw.shape[0]} scores for {self.batch_size} images"
                    )
                out[spec.name][begin : begin + real] = raw[:real]
        return out


def prefetch_weights(names_or_preset: str | Sequence[str]) -> dict[str, list[str]]:
    """Download the weights of the named metrics into this machine's caches (needs internet).

    Builds each metric once on the CPU with downloads allowed, then returns what is still missing (empty when
    everything is in place), so the caches can be copied to offline machines.
    """
    specs = resolve_metrics(names_or_preset)
    for spec in specs:
        if spec.needs_weights:
            _create(spec, torch.device("cpu"))
    return missing_weights(specs)
