"""Real-ESRGAN-style degradation: config, sampled parameters, the deterministic chain, and HR ingestion.

Names are loaded on first use (PEP 562), so importing `dp2o.degrade.config` (as the pipeline config does)
never imports torch or scipy.
"""

from __future__ import annotations

from dp2o.lazy import lazy_exports

_EXPORTS = {
    "DegradationConfig": "dp2o.degrade.config",
    "RoundConfig": "dp2o.degrade.config",
    "USMConfig": "dp2o.degrade.config",
    "min_hr_side": "dp2o.degrade.config",
    "ImageRejected": "dp2o.degrade.ingest",
    "SourceRef": "dp2o.degrade.ingest",
    "crop_origin": "dp2o.degrade.ingest",
    "list_sources": "dp2o.degrade.ingest",
    "load_hr": "dp2o.degrade.ingest",
    "DegradationParams": "dp2o.degrade.params",
    "params_arrow_fields": "dp2o.degrade.params",
    "sample_params": "dp2o.degrade.params",
    "degrade_batch": "dp2o.degrade.pipeline",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
