"""Evaluation: M candidates per held-out input with fixed seeds (`candidates`), Best/Mean/Worst@M summaries with
intervals over inputs and photos (`summary`) or over training seeds (`at_m`), and the evaluate stage (`stage`).

Names are loaded on first use (PEP 562), so registering the evaluate stage imports neither scipy nor torch.
"""

from __future__ import annotations

from dp2o.lazy import lazy_exports

_EXPORTS = {
    "AT_M_STATS": "dp2o.evaluate.at_m",
    "difference_vs": "dp2o.evaluate.at_m",
    "markdown_table": "dp2o.evaluate.at_m",
    "per_input_at_m": "dp2o.evaluate.at_m",
    "run_at_m": "dp2o.evaluate.at_m",
    "seed_differences": "dp2o.evaluate.at_m",
    "summarize_over_seeds": "dp2o.evaluate.at_m",
    "t_interval": "dp2o.evaluate.at_m",
    "evaluation_seed": "dp2o.evaluate.candidates",
    "fit_bounds": "dp2o.evaluate.candidates",
    "hybrid_reward": "dp2o.evaluate.candidates",
    "sample_candidates": "dp2o.evaluate.candidates",
    "score_candidates": "dp2o.evaluate.candidates",
    "at_m_summary": "dp2o.evaluate.summary",
    "summary_markdown": "dp2o.evaluate.summary",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
