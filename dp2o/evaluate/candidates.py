"""Evaluation candidates in memory: fixed evaluation seeds, sampling M candidates per input, scoring them
(full-reference metrics only where an HR image exists) and the hybrid reward on a frozen scale.

Used by the evaluate stage and by the scripts that evaluate many models in memory (the miniature
reproduction, the tiny model's check against bicubic). The design choice a reader would miss: the candidate
seeds depend on (seed, sample id, candidate) only, so two models evaluated with one seed see the same noise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dp2o.seeding import derive_seed

#: images per metric call; fixed (not the runtime batch size) because learned metrics' scores can depend on
#: the batch size (see `dp2o.reward.scoring`), and evaluation scores must not depend on runtime settings
SCORE_BATCH = 8


def evaluation_seed(seed: int, sample_id: str, candidate: int) -> int:
    """The seed of candidate `candidate` of input `sample_id`; the same for every model evaluated."""
    return derive_seed(seed, "evaluate", sample_id, candidate)


def sample_candidates(
    backend,
    ids: Sequence[str],
    lr,
    m: int,
    seed: int,
    batch: int = 8,
    *,
    seed_of: Callable[[str, int], int] | None = None,
):
    """M candidates per input from one backend: float [n, m, 3, scale·h, scale·w] on the CPU.

    lr: the n inputs, all the same size: a uint8 [n, 3, h, w] tensor (or float in [0, 1]), or n uint8
        [h, w, 3] arrays. seed: the evaluation seed; candidate c of ids[i] uses `evaluation_seed(seed, ids[i],
        c)`, or `seed_of(ids[i], c)` when given. batch: (LR, seed) rows per `backend.sample` call.
    Values are in [0, 1] except where the backend produced NaN/inf, which are returned as they are (the
    caller decides what a failed candidate is).
    """
    import torch

    from dp2o.tario import to_tensor01

    if isinstance(lr, torch.Tensor):
        lr01 = lr.float() / 255 if lr.dtype == torch.uint8 else lr.float()
    else:
        lr01 = to_tensor01(lr)
    if lr01.ndim != 4 or lr01.shape[0] != len(ids):
        raise ValueError(f"sample_candidates: {len(ids)} ids but LR of shape {tuple(lr01.shape)}")
    seed_of = seed_of or (lambda sid, c: evaluation_seed(seed, sid, c))
    rows = [(i, c) for i in range(len(ids)) for c in range(m)]
    out = torch.empty(len(ids), m, 3, lr01.shape[-2] * backend.scale, lr01.shape[-1] * backend.scale)
    backend.eval()
    for lo in range(0, len(rows), batch):
        chunk = rows[lo : lo + batch]
        idx = torch.tensor([i for i, _ in chunk])
        sr = backend.sample(lr01[idx], [seed_of(ids[i], c) for i, c in chunk])
        for (i, c), img in zip(chunk, sr, strict=True):
            out[i, c] = img
    return out


def _kind_view(scorer, kind: str):
    """A scorer that shares `scorer`'s loaded metric models but computes only the metrics of `kind`."""
    specs = [s for s in scorer.specs if s.kind == kind]
    if not specs:
        return None
    view = copy.copy(scorer)
    view.specs = specs
    view.metrics = {s.name: scorer.metrics[s.name] for s in specs}
    return view


def score_candidates(scorer, candidates, hr: Sequence) -> dict:
    """Raw metric scores of M candidates per input: {metric name: float64 [n, m]}.

    scorer: a `dp2o.reward.scoring.MetricScorer`. candidates: float [n, m, 3, H, W] in [0, 1]. hr: per input
    a uint8 [H, W, 3] array, a [3, H, W] tensor (uint8, or float in [0, 1]), or None when the input has no
    HR: its full-reference metrics are NaN and only the no-reference ones are computed.
    """
    import numpy as np
    import torch

    n, m = candidates.shape[:2]
    if len(hr) != n:
        raise ValueError(f"score_candidates: {n} inputs of candidates but {len(hr)} HR entries")
    out = {s.name: np.full((n, m), np.nan) for s in scorer.specs}

    def ref(x):
        t = (
            torch.from_numpy(np.require(x, requirements=["C", "W"])).permute(2, 0, 1)
            if isinstance(x, np.ndarray)
            else x
        )
        return t.float() / 255 if t.dtype == torch.uint8 else t.float()

    for has_hr, view in ((True, scorer), (False, _kind_view(scorer, "NR"))):
        idx = [i for i in range(n) if (hr[i] is not None) == has_hr]
        if not idx or view is None:
            continue
        sr = candidates[idx].reshape(len(idx) * m, *candidates.shape[2:])
        refs = torch.stack([ref(hr[i]) for i in idx]) if has_hr else candidates[idx][:, 0]
        scores = view.score(sr, refs[:, None].expand(-1, m, -1, -1, -1).reshape(sr.shape))
        for name, values in scores.items():
            out[name][idx] = values.reshape(len(idx), m)
    return out


def _only(cfg, specs):
    """`cfg` with metric_weights restricted to `specs` (compute_reward refuses weights of absent metrics)."""
    names = {s.name for s in specs}
    return cfg.model_copy(
        update={"metric_weights": {k: v for k, v in cfg.metric_weights.items() if k in names}}
    )


def fit_bounds(table, specs, cfg) -> dict:
    """Dataset normalisation bounds of the hybrid reward from `table` (the base model's candidates): FR metrics
    over the rows with HR (`has_hr`), NR metrics over every row. Rows must have finite scores."""
    from dp2o.reward.hybrid import compute_reward

    fr = [s for s in specs if s.kind == "FR"]
    nr = [s for s in specs if s.kind == "NR"]
    with_hr = table.filter(table["has_hr"]) if "has_hr" in table.column_names else table
    bounds: dict[str, Any] = {"normalization": "dataset", "clip_percentiles": list(cfg.clip_percentiles)}
    metrics: dict[str, Any] = {}
    if fr and with_hr.num_rows:
        metrics.update(compute_reward(with_hr, fr, _only(cfg, fr))[1]["metrics"])
    if nr and table.num_rows:
        metrics.update(compute_reward(table, nr, _only(cfg, nr))[1]["metrics"])
    bounds["metrics"] = metrics
    return bounds


def hybrid_reward(table, specs, cfg, bounds: Mapping):
    """The hybrid reward (float64 per row) with frozen `bounds` (`fit_bounds`): rows with HR (`has_hr`) get
    the FR and NR parts, rows without the NR part alone."""
    import numpy as np
    import pyarrow as pa

    from dp2o.reward.hybrid import compute_reward

    nr = [s for s in specs if s.kind == "NR"]
    has_hr = (
        table["has_hr"].to_numpy(zero_copy_only=False).astype(bool)
        if "has_hr" in table.column_names
        else np.ones(table.num_rows, dtype=bool)
    )
    reward = np.full(table.num_rows, np.nan)
    for mask, use, rcfg in ((has_hr, specs, cfg), (~has_hr, nr, _only(cfg, nr))):
        if mask.any():
            reward[mask] = compute_reward(table.filter(pa.array(mask)), use, rcfg, bounds=bounds)[0]
    return reward
