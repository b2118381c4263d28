"""What the `offline` reward preset costs per image on one CPU thread, metric by metric, at the crop sizes the
project scores (64 px: the miniatures; 128 px: the demo).

    python -m benchmarks.offline_metric_cost     # writes benchmarks/results/offline_metric_cost.json

Images: 8 degraded-crop HR targets from each of four bundled photos, scored against themselves (the cost does
not depend on the candidate). Each metric is built once and warmed on two images; the figure is the best of
three timed passes over all 32, divided by 32. The whole preset is timed the same way, next to the sum of its
metrics (the difference is the preset's shared overhead).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

PHOTOS = ["astronaut.png", "chelsea.png", "retina.jpg", "I03.bmp"]


def cost_ms(name: str, ids: list[str], cands: torch.Tensor, hr: torch.Tensor, repeats: int = 3) -> float:
    from dp2o.evaluate.scoring import RewardModel
    from dp2o.reward.hybrid import RewardConfig

    model = RewardModel(name, RewardConfig())
    model.raw(ids[:2], cands[:2], hr[:2])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.raw(ids, cands, hr)
        best = min(best, time.perf_counter() - t)
    return 1000 * best / len(ids)


def main(argv: list[str] | None = None) -> None:
    from dp2o.reward.registry import resolve_metrics
    from scripts.mini_controls import photo_crops

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/offline_metric_cost.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    metrics = [s.name for s in resolve_metrics("offline")]
    result = {"threads": 1, "machine": platform.processor() or platform.machine(), "images": 32, "sizes": {}}
    for size in args.sizes:
        ids, hr, _, _ = photo_crops(PHOTOS, 8, size, 0, "metric-cost")
        cands = (hr.float() / 255)[:, None]
        per = {}
        for name in metrics:
            if size < 96 and name == "niqe":
                continue
            per[name] = cost_ms(name, ids, cands, hr)
        whole = cost_ms("offline", ids, cands, hr)
        result["sizes"][str(size)] = {
            "ms_per_image": per,
            "offline_preset_ms": whole,
            "sum_of_metrics_ms": sum(per.values()),
        }
        print(
            f"{size} px: offline {whole:.1f} ms/image; " + ", ".join(f"{k} {v:.1f}" for k, v in per.items())
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
