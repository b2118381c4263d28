"""Package exports loaded on first use (PEP 562), so importing a package (e.g. for its config classes) never
imports the heavy modules (torch, scipy, pyiqa) behind its other names; a config error is then reported before
any of those load."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for a package whose names `exports` maps to the modules that define them."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__
