"""Per-sample random generators derived from (global seed, stage, sample id[, candidate]).

Every random choice in the pipeline is drawn from a generator made here, never from global RNG state, so a
result depends only on *what* is computed — not on worker count, shard size, batch order or resume point.
Seeds are 63-bit integers from BLAKE2b over a canonical string, so they are stable across Python versions,
platforms and processes (unlike `hash()`).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_MASK63 = (1 << 63) - 1


def derive_seed(global_seed: int, stage: str, *keys: object) -> int:
    """A 63-bit seed that is a pure function of its arguments.

    >>> derive_seed(0, "sample", "img-0001", 3) == derive_seed(0, "sample", "img-0001", 3)
    True
    """
    text = "\x1f".join([str(int(global_seed)), stage, *(str(k) for k in keys)])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def numpy_rng(seed: int) -> np.random.Generator:
    """A NumPy generator (PCG64) for `seed`."""
    return np.random.default_rng(seed)


def torch_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with `seed` on `device`."""
    import torch  # here, not at the top: planners and config checks derive seeds without torch

    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
