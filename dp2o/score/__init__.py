"""Scoring: raw IQA metric columns per candidate (`stage`); the metrics themselves live in `dp2o.reward`."""
