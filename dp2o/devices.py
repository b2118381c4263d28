"""The one place where a configured device name becomes a torch device (`auto` → cuda when available)."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
