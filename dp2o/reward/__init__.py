"""The hybrid IQA reward: metric registry (`registry`), raw scoring through pyiqa (`scoring`), and the
normalised reward computed from stored raw scores (`hybrid`).

Importing this package imports neither pyiqa nor torch: names are loaded on first use (PEP 562), so the
pipeline config can validate metric names from `registry` (plain data) before any heavy import.
"""

from __future__ import annotations

from dp2o.lazy import lazy_exports

_EXPORTS = {
    "RewardConfig": "dp2o.reward.hybrid",
    "compute_reward": "dp2o.reward.hybrid",
    "METRICS": "dp2o.reward.registry",
    "PRESETS": "dp2o.reward.registry",
    "MetricSpec": "dp2o.reward.registry",
    "MetricWeightsMissing": "dp2o.reward.registry",
    "WeightFile": "dp2o.reward.registry",
    "missing_weights": "dp2o.reward.registry",
    "resolve_metrics": "dp2o.reward.registry",
    "MetricScorer": "dp2o.reward.scoring",
    "prefetch_weights": "dp2o.reward.scoring",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
