"""Real-ESRGAN-style degradation: config, sampled parameters, the deterministic chain, and HR ingestion."""

from dp2o.degrade.config import DegradationConfig, RoundConfig, USMConfig
from dp2o.degrade.ingest import ImageRejected, SourceRef, crop_origin, list_sources, load_hr
from dp2o.degrade.params import DegradationParams, params_arrow_fields, sample_params
from dp2o.degrade.pipeline import degrade_batch, min_hr_side

__all__ = [
    "DegradationConfig",
    "DegradationParams",
    "ImageRejected",
    "RoundConfig",
    "SourceRef",
    "USMConfig",
    "crop_origin",
    "degrade_batch",
    "list_sources",
    "load_hr",
    "min_hr_side",
    "params_arrow_fields",
    "sample_params",
]
