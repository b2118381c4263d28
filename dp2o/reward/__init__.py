"""The hybrid IQA reward: metric registry (`registry`), raw scoring through pyiqa (`scoring`), and the
normalised reward computed from stored raw scores (`hybrid`).

Importing this package does not import pyiqa; only building a `MetricScorer` does.
"""

from dp2o.reward.hybrid import RewardConfig, compute_reward
from dp2o.reward.registry import (
    METRICS,
    PRESETS,
    MetricSpec,
    MetricWeightsMissing,
    WeightFile,
    missing_weights,
    resolve_metrics,
)
from dp2o.reward.scoring import MetricScorer, prefetch_weights

__all__ = [
    "METRICS",
    "PRESETS",
    "MetricScorer",
    "MetricSpec",
    "MetricWeightsMissing",
    "RewardConfig",
    "WeightFile",
    "compute_reward",
    "missing_weights",
    "prefetch_weights",
    "resolve_metrics",
]
