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

#: the evaluate stage's in-memory building blocks, imported on first use (`dp2o.evaluate.stage` pulls in the
#: stage registry, which `import dp2o.evaluate` alone should not)
_STAGE_EXPORTS = (
    "at_m_summary",
    "evaluation_seed",
    "fit_bounds",
    "hybrid_reward",
    "sample_candidates",
    "score_candidates",
    "summary_markdown",
)
__all__ += list(_STAGE_EXPORTS)


def __getattr__(name: str):
    if name in _STAGE_EXPORTS:
        from dp2o.evaluate import stage

        return getattr(stage, name)
    raise AttributeError(f"module 'dp2o.evaluate' has no attribute {name!r}")
