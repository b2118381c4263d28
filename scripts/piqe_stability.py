"""Do the no-reference metrics rank the candidates of one input the same way when the window moves by 1–4 px?

    python -m scripts.piqe_stability                 # writes benchmarks/results/ranking_stability.json
    python -m scripts.piqe_stability --metrics piqe entropy --sizes 64 --out /tmp/s.json

A reward only uses a metric to order the M candidates of one input (pairs are built within an input), so what
matters is whether that order survives a change that should not matter: the same candidates, seen through a
window shifted by a few pixels. For every crop size (64 px: the miniature reproduction's crops; 128 px: the
demo's), inputs are crops of `bundled://train` and candidates are the tiny model's M samples per input, exactly
as `scripts/mini_repro.py` makes them (read from its cache under --work-dir when present). Each metric scores the
(crop − 4) px window of every candidate at offset (0, 0) and at the shifted offsets `SHIFTS`. Reported per metric:

- `spearman`: per input, the Spearman rank correlation between the candidates' scores in the unshifted window
  and in a shifted one, averaged over the shifts; then the mean over inputs with a 95 % Student-t interval over
  inputs, and over photos (each photo's inputs averaged first: the interval that says whether it generalises
  beyond these photos). Ranks within one input do not change when a constant is subtracted, so this equals the
  correlation of scores centred per input. `spearman_by_shift` gives it per shift.
- `centred_shift_std` vs `between_candidate_std`: scores centred per input and window (the part of a shift's
  effect common to all candidates of an input is removed, as ranking removes it); the std of a candidate's
  centred score over the windows, against the std of the candidates' scores within an input. Their ratio is
  the noise-to-signal of the ranking. `uncentred_shift_std` is the raw score's std over windows, which mixes in
  the common part (the figure the first version of this script reported, which overstated the instability).

A metric that cannot score the window size (NIQE needs 96 px) is reported as undefined there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

#: (dy, dx) offsets of the shifted windows, in pixels; the unshifted window is at (0, 0)
SHIFTS = ((0, 1), (1, 0), (1, 1), (2, 0), (0, 2), (4, 4))
MAX_SHIFT = 4
#: crop size → (training inputs, candidates per input); 64 px is the miniature's shipped setting, 128 px the
#: demo's crop size (fewer inputs: each candidate costs four times as much to sample and score)
SIZES = {64: (24, 16), 128: (12, 16)}
DEFAULT_METRICS = ("piqe", "entropy", "niqe", "brisque")
#: the stability the issue asks of a metric before it joins the `offline` preset
THRESHOLD = 0.8


def t_interval(values: np.ndarray) -> list[float]:
    """95 % Student-t interval of the mean of the finite `values` (`dp2o.evaluate.t_interval`; NaN bounds with
    fewer than two)."""
    from dp2o.evaluate.at_m import t_interval as mean_and_interval

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return [float("nan"), float("nan")]
    return list(mean_and_interval(values)[1:])


def candidates_at(size: int, work_dir: Path, seed: int):
    """(ids, photo of each id, candidates float [n, M, 3, size, size]) as the miniature reproduction makes them."""
    from scripts import mini_repro

    n, m = SIZES[size]
    cfg = mini_repro.parse_args(
        ["--work-dir", str(work_dir), "--crop", str(size), "--train-inputs", str(n), "--m", str(m)]
        + ["--seed", str(seed)]
    )
    _, _, ids, _, _, cands = mini_repro.training_candidates(cfg)
    photos = mini_repro.crop_photos("bundled://train", n, "mini-train")
    return ids, [photos[i] for i in ids], cands


def window_scores(scorer, name: str, cands: torch.Tensor, window: int) -> np.ndarray:
    """Scores [n, M, 1 + len(SHIFTS)]: every candidate through the unshifted and each shifted window."""
    n, m = cands.shape[:2]
    out = np.empty((n, m, 1 + len(SHIFTS)))
    for k, (dy, dx) in enumerate(((0, 0), *SHIFTS)):
        crops = cands[..., dy : dy + window, dx : dx + window].reshape(n * m, 3, window, window).contiguous()
        out[..., k] = scorer.score(crops, crops)[name].reshape(n, m)
    return out


def stability(scores: np.ndarray, photos: list[str]) -> dict:
    """The statistics of the module docstring from scores [n inputs, M candidates, windows]."""
    n, m, w = scores.shape
    rho = np.full((n, w - 1), np.nan)
    for i in range(n):
        for k in range(1, w):
            if np.ptp(scores[i, :, 0]) > 0 and np.ptp(scores[i, :, k]) > 0:
                rho[i, k - 1] = stats.spearmanr(scores[i, :, 0], scores[i, :, k]).statistic
    per_input = np.nanmean(rho, axis=1)
    by_photo = {p: float(np.nanmean(per_input[[j for j, q in enumerate(photos) if q == p]])) for p in photos}
    centred = scores - scores.mean(axis=1, keepdims=True)
    shift_std = float(centred.std(axis=2).mean())
    spread = float(scores[:, :, 0].std(axis=1).mean())
    return {
        "spearman": float(np.nanmean(per_input)),
        "spearman_ci95_over_inputs": t_interval(per_input),
        "spearman_ci95_over_photos": t_interval(np.array(list(by_photo.values()))),
        "spearman_min_over_inputs": float(np.nanmin(per_input)),
        "spearman_by_shift": {
            f"{dy},{dx}": float(np.nanmean(rho[:, k])) for k, (dy, dx) in enumerate(SHIFTS)
        },
        "spearman_by_photo": by_photo,
        "centred_shift_std": shift_std,
        "between_candidate_std": spread,
        "shift_to_spread_ratio": shift_std / spread if spread > 0 else float("nan"),
        "uncentred_shift_std": float(scores.std(axis=2).mean()),
        "stable": bool(np.nanmean(per_input) >= THRESHOLD),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric names of dp2o's registry"
    )
    p.add_argument(
        "--sizes", nargs="+", type=int, default=sorted(SIZES), choices=sorted(SIZES), help="crop sizes"
    )
    p.add_argument(
        "--work-dir", type=Path, default=Path("runs/mini_repro"), help="mini_repro's candidate cache"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="mini_repro's global seed (crops, degradations, sampling)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "ranking_stability.json",
        help="where the JSON summary goes",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dp2o.reward import MetricScorer, resolve_metrics

    started = time.process_time()
    summary: dict = {
        "shifts": [list(s) for s in SHIFTS],
        "threshold": THRESHOLD,
        "command": "python -m scripts.piqe_stability",
        "sizes": {},
    }
    for size in args.sizes:
        t0 = time.process_time()
        ids, photos, cands = candidates_at(size, args.work_dir, args.seed)
        window = size - MAX_SHIFT
        entry: dict = {
            "inputs": len(ids),
            "photos": len(set(photos)),
            "candidates_per_input": int(cands.shape[1]),
            "window_px": window,
            "candidates_cpu_s": round(time.process_time() - t0, 1),
            "metrics": {},
        }
        for spec in resolve_metrics(args.metrics):
            t0 = time.process_time()
            if window < spec.min_side:
                entry["metrics"][spec.name] = {"undefined": f"needs windows of at least {spec.min_side} px"}
                continue
            scorer = MetricScorer([spec], batch_size=int(cands.shape[1]))
            result = stability(window_scores(scorer, spec.name, cands, window), photos)
            result["cpu_s"] = round(time.process_time() - t0, 1)
            entry["metrics"][spec.name] = result
            print(
                f"{size} px {spec.name:8s} spearman {result['spearman']:.3f} "
                f"{[round(v, 3) for v in result['spearman_ci95_over_inputs']]} (photos "
                f"{[round(v, 3) for v in result['spearman_ci95_over_photos']]}), shift/spread "
                f"{result['shift_to_spread_ratio']:.3f}",
                flush=True,
            )
        summary["sizes"][str(size)] = entry
    summary["cpu_s"] = round(time.process_time() - started, 1)
    text = json.dumps(summary, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
