"""Candidate sampling: M candidates per LR input from a Real-ISR backend, one recorded seed each (`stage`)."""

from dp2o.sample.stage import candidate_key, candidate_seeds, sample_lr_batch, sampling_backend

__all__ = ["candidate_key", "candidate_seeds", "sample_lr_batch", "sampling_backend"]
