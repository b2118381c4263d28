"""From HR photos to degraded training or evaluation crops: the one place where a crop's seed decides its
position and its degradation parameters.

The degrade stage (one sample id per crop) and the in-memory evaluations (the miniature reproduction, the
tiny model's verification: n crops cycling over a few photos) both go through `crop_and_params`, so a crop
is the same function of (photo, seed) everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dp2o.degrade.config import DegradationConfig
from dp2o.degrade.ingest import crop_origin
from dp2o.degrade.params import DegradationParams, sample_params
from dp2o.seeding import derive_seed


def crop_and_params(
    height: int, width: int, crop_size: int, cfg: DegradationConfig, seed: int
) -> tuple[int, int, DegradationParams]:
    """(y, x) of a crop_size crop inside a height x width photo and the degradation parameters, both drawn
    from `seed` (already derived per sample)."""
    y, x = crop_origin(height, width, crop_size, seed)
    return y, x, sample_params(cfg, seed)


def degraded_crops(
    photos: Sequence[np.ndarray], n: int, crop: int, seed: int, key: str, cfg: DegradationConfig | None = None
):
    """n crops cycling over `photos` (uint8 [H, W, 3]), crop i seeded by derive_seed(seed, key, i), degraded
    with the Real-ESRGAN chain → (hr uint8 [n, 3, crop, crop], lr uint8 [n, 3, crop/scale, crop/scale]).

    The chain needs HR crops of at least `min_hr_side` (76 px with the defaults, for its 21-tap kernels);
    smaller crops are degraded at the smallest fitting size and then centre-cropped in HR and LR together,
    so they are exactly what the chain gives inside a larger image. Photos must be at least that size.
    """
    import torch

    from dp2o.degrade.pipeline import degrade_batch, min_hr_side

    cfg = cfg or DegradationConfig()
    big = crop
    while big < min_hr_side(cfg) or (big - crop) % (2 * cfg.scale):
        big += cfg.scale
    hrs, params = [], []
    for i in range(n):
        img = photos[i % len(photos)]
        y, x, p = crop_and_params(img.shape[0], img.shape[1], big, cfg, derive_seed(seed, key, i))
        hrs.append(torch.from_numpy(np.ascontiguousarray(img[y : y + big, x : x + big])).permute(2, 0, 1))
        params.append(p)
    hr, lr = degrade_batch(torch.stack(hrs), params, cfg)
    o, s = (big - crop) // 2, cfg.scale
    return hr[..., o : o + crop, o : o + crop], lr[
        ..., o // s : o // s + crop // s, o // s : o // s + crop // s
    ]
