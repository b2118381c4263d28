"""Evaluation: Best/Mean/Worst@M of the reward per input, averaged per run, with t-intervals over training seeds.

See `dp2o.evaluate.at_m`; everything here is a pure function on pyarrow tables.
"""

from dp2o.evaluate.at_m import (
    AT_M_STATS,
    difference_vs,
    markdown_table,
    per_input_at_m,
    run_at_m,
    seed_differences,
    summarize_over_seeds,
    t_interval,
)

__all__ = [
    "AT_M_STATS",
    "difference_vs",
    "markdown_table",
    "per_input_at_m",
    "run_at_m",
    "seed_differences",
    "summarize_over_seeds",
    "t_interval",
]
