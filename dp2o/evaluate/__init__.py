"""Evaluation: M candidates per held-out input with fixed seeds (`candidates`), Best/Mean/Worst@M summaries with
intervals over inputs and photos (`summary`) or over training seeds (`at_m`), and the evaluate stage (`stage`).
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
from dp2o.evaluate.candidates import (
    evaluation_seed,
    fit_bounds,
    hybrid_reward,
    sample_candidates,
    score_candidates,
)
from dp2o.evaluate.summary import at_m_summary, summary_markdown

__all__ = [
    "at_m_summary",
    "evaluation_seed",
    "fit_bounds",
    "hybrid_reward",
    "sample_candidates",
    "score_candidates",
    "summary_markdown",
    "AT_M_STATS",
    "difference_vs",
    "markdown_table",
    "per_input_at_m",
    "run_at_m",
    "seed_differences",
    "summarize_over_seeds",
    "t_interval",
]
