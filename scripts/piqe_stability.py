"""How stable are the no-reference `offline` metrics on the miniature reproduction's 64 px candidates?

    python -m scripts.piqe_stability            # prints a JSON summary; --out FILE also writes it

For each training input of `scripts/mini_repro.py` (same crops, same base-model candidates, read from its cache
when present), a metric is computed on 56 px windows of one candidate shifted by (0,0), (1,1), (2,0), (0,2) and
(4,4) pixels — the same content, realigned — and on the same 56 px window of all M candidates. A metric whose
score moves about as much under a few-pixel shift as between candidates cannot rank candidates: the
"shift std" should be much smaller than the "between-candidate std". It also reports each metric's within-input correlation with the `offline` reward
(rewards and metrics centred per input), i.e. how much of the ranking that builds pairs it decides.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyiqa
import torch

from scripts import mini_repro

SHIFTS = ((0, 0), (1, 1), (2, 0), (0, 2), (4, 4))
WINDOW = 56


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", nargs="+", default=["piqe", "entropy"], help="pyiqa metric names")
    p.add_argument("--work-dir", type=Path, default=Path("runs/mini_repro"), help="mini_repro's cache folder")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    cfg = mini_repro.parse_args(["--work-dir", str(args.work_dir)])
    _, _, ids, hr, _, cands = mini_repro.training_candidates(cfg)

    summary: dict = {"inputs": len(ids), "candidates_per_input": cands.shape[1], "window_px": WINDOW}
    for name in args.metrics:
        metric = pyiqa.create_metric(name, device="cpu")
        one = cands[:, 0]
        shifted = np.stack(
            [metric(one[..., y : y + WINDOW, x : x + WINDOW]).flatten().numpy() for y, x in SHIFTS]
        )
        flat = cands[..., :WINDOW, :WINDOW].reshape(-1, *cands.shape[2:3], WINDOW, WINDOW)
        per_candidate = metric(flat).flatten().numpy().reshape(cands.shape[0], cands.shape[1])
        summary[name] = {
            "shift_std": float(shifted.std(axis=0).mean()),
            "between_candidate_std": float(per_candidate.std(axis=1).mean()),
            "between_input_std": float(per_candidate.mean(axis=1).std()),
        }
    # how much of the `offline` reward's ranking within an input each no-reference metric decides
    from dp2o.evaluate.scoring import RewardModel

    reward_model = RewardModel("offline")
    table = reward_model.reward(reward_model.raw(ids, cands, hr)).to_pandas()
    cols = [c for c in ("piqe", "entropy", "reward") if c in table]
    within = table[cols] - table.groupby("sample_id")[cols].transform("mean")
    for name in ("piqe", "entropy"):
        if name in summary:
            summary[name]["within_input_corr_with_offline_reward"] = float(
                within[name].corr(within["reward"])
            )
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
