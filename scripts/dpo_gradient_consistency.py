"""How consistent is the Diffusion-DPO gradient of the tiny model, per band of timesteps?

    python -m scripts.dpo_gradient_consistency            # writes docs/mini_repro/gradient_consistency.json

At initialisation (policy = reference) the DPO gradient of a pair is proportional to ∇(e_θ^w − e_θ^l) at one
drawn (t, ε). For each band of t, this script averages that gradient over two independent sets of
`--pairs` pairs of the mini reproduction's training data (M=16, N=4 of the shipped reward) and reports the
cosine between the two means. A cosine near 1 means the band pushes the model in one direction whatever the
draw; near 0, its per-pair gradients are mostly noise. With signal power S and per-pair noise V, the expected
cosine is S / (S + V/pairs), so the script also reports the implied V/S. It also reports the cosine between
each band's mean direction and the full range's, and the mean gradient norm per pair.

Uses the cached base candidates of `scripts/mini_repro.py` (sampled on first use).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dp2o.evaluate.scoring import RewardModel
from dp2o.pairs.build import build_pairs
from dp2o.reward.hybrid import RewardConfig
from dp2o.seeding import derive_seed, numpy_rng
from dp2o.train.loop import share_noise
from scripts import mini_repro

BANDS = ((0.0, 0.05), (0.05, 0.2), (0.2, 0.5), (0.5, 1.0), (0.0, 0.3), (0.0, 1.0))


def mean_gradient(backend, data, pairs, band, draw: int, n: int, chunk: int = 8) -> torch.Tensor:
    """Mean over n pairs (drawn with `draw`'s seed) of ∇(e_θ^w − e_θ^l), t uniform in `band`."""
    ids, cands, lr01 = data
    row = {s: i for i, s in enumerate(ids)}
    rng = numpy_rng(derive_seed(0, "grad", band[0], band[1], draw))
    picks = rng.integers(0, pairs.num_rows, n)
    params = list(backend.unet.parameters())
    total = [torch.zeros_like(p) for p in params]
    sid, win, lose = (pairs[c].to_pylist() for c in ("sample_id", "win", "lose"))
    for lo in range(0, n, chunk):
        sel = picks[lo : lo + chunk]
        k = len(sel)
        rows = [row[sid[j]] for j in sel]
        targets = torch.cat([cands[rows, [win[j] for j in sel]], cands[rows, [lose[j] for j in sel]]])
        gen = torch.Generator().manual_seed(derive_seed(0, "grad-noise", band[0], band[1], draw, lo))
        b = share_noise(
            backend.make_noised_batch(targets, torch.cat([lr01[rows], lr01[rows]]), gen, t_range=band), k
        )
        err, _ = backend.prediction_errors(b)
        grads = torch.autograd.grad((err[:k] - err[k:]).sum(), params)
        for acc, g in zip(total, grads, strict=True):
            acc += g
    return torch.cat([g.flatten() for g in total]).double() / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64, help="pairs per half")
    p.add_argument("--n-top", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/mini_repro/gradient_consistency.json"))
    own = p.parse_args(argv)
    torch.set_num_threads(own.threads)
    args = mini_repro.parse_args([])
    base, _, ids, hr, lr, cands = mini_repro.training_candidates(args)
    rm = RewardModel(args.metrics, RewardConfig())
    rewards = rm.reward(rm.raw(ids, cands, hr))
    pairs, _ = build_pairs(
        rewards["sample_id"], rewards["candidate"], rewards["reward"], n_top=own.n_top, weighting="uniform"
    )
    data = (ids, cands, lr.float() / 255)

    means = {band: [mean_gradient(base, data, pairs, band, d, own.pairs) for d in (0, 1)] for band in BANDS}
    full = (means[(0.0, 1.0)][0] + means[(0.0, 1.0)][1]) / 2
    rows = []
    for band, (g1, g2) in means.items():
        cos = float(torch.nn.functional.cosine_similarity(g1, g2, dim=0))
        both = (g1 + g2) / 2
        rows.append(
            {
                "t_range": list(band),
                "cos_between_halves": round(cos, 4),
                "noise_to_signal_per_pair": round(own.pairs * (1 / cos - 1), 1) if cos > 0 else None,
                "cos_with_full_range_direction": round(
                    float(torch.nn.functional.cosine_similarity(both, full, dim=0)), 4
                ),
                "mean_gradient_norm": float(f"{float(both.norm()):.4g}"),
            }
        )
        print(rows[-1], flush=True)
    own.out.parent.mkdir(parents=True, exist_ok=True)
    own.out.write_text(
        json.dumps({"pairs_per_half": own.pairs, "n_top": own.n_top, "m": args.m, "bands": rows}, indent=2)
        + "\n"
    )
    print("wrote", own.out)


if __name__ == "__main__":
    main()
