"""Real-ISR backends behind one interface (`dp2o.models.base.Backend`), built from a `BackendConfig`.

Backends are imported lazily so that using the tiny model never imports the SD2/FLUX code paths, and the
interface itself (`base`, which needs torch) on first use (PEP 562), so `dp2o.models.config` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dp2o.models.config import BackendConfig

if TYPE_CHECKING:
    from dp2o.models.base import Backend, BackendError, NoisedBatch

_FROM_BASE = ("Backend", "BackendError", "NoisedBatch")

#: backend kind -> "module:factory"; each factory takes a BackendConfig and returns a Backend
_FACTORIES = {
    "tiny": "dp2o.models.tiny:TinyBackend.from_config",
    "sd2-controlnet": "dp2o.models.sd2_controlnet:SD2ControlNetBackend.from_config",
    "flux-controlnet": "dp2o.models.flux_controlnet:FluxControlNetBackend.from_config",
    "sd-x4-upscaler": "dp2o.models.sd_upscaler:SDUpscalerBackend.from_config",
    "null": "dp2o.models.null:NullBackend.from_config",
}


def build_backend(cfg: BackendConfig) -> Backend:
    """Load the backend named by `cfg.kind` (weights via `from_pretrained`)."""
    module_name, _, attr = _FACTORIES[cfg.kind].partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj(cfg)


def __getattr__(name: str):
    if name in _FROM_BASE:
        return getattr(importlib.import_module("dp2o.models.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Backend", "BackendConfig", "BackendError", "NoisedBatch", "build_backend"]
