"""Preference pairs and hierarchical (HPO) weights: pure functions from a reward table to a pairs table."""

from dp2o.pairs.build import PairStats, build_pairs

__all__ = ["PairStats", "build_pairs"]
