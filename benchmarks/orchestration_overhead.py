"""Orchestration overhead of the Ray executor: a sample stage of >= 1,000 shards (>= 100k candidates) through
the null backend (deterministic images, no model), so what is timed is planning, scheduling, PNG coding and
commits, not sampling.

    python -m benchmarks.orchestration_overhead                      # 1,000 shards x 2 inputs x 50 candidates
    python -m benchmarks.orchestration_overhead --shards 20 --quick  # a smoke run (the test suite's)

Per shard, overhead = (wall x workers - sum of shard bodies) / shards: everything a shard costs besides its
body (scheduling, argument shipping, commit: moves, re-checks, sha256, marker). The named baseline is the
local executor (this process, a loop) on the same plan in the same run. The paper-scale yardstick is a
shard's GPU time: `--inputs-per-shard-paper` LR inputs x M=32 candidates x the measured C-SD2 seconds per
candidate on an H100 (benchmarks/results/gpu/sample_gpu.json). Also reported: planning time and the planner's
peak memory for the sample stage, and the largest task parameter of a 30,000-input paper plan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
SAMPLE_GPU = REPO / "benchmarks" / "results" / "gpu" / "sample_gpu.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--inputs-per-shard", type=int, default=2)
    p.add_argument("--candidates", type=int, default=50, help="M")
    p.add_argument("--lr-size", type=int, default=8, help="LR side in px (outputs are 4x)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs of the local Ray instance)")
    p.add_argument(
        "--baseline-shards", type=int, default=None, help="shards the local baseline runs (default all)"
    )
    p.add_argument(
        "--inputs-per-shard-paper", type=int, default=64, help="degrade.images_per_shard at paper scale"
    )
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "overhead")
    p.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "orchestration_overhead.json"
    )
    p.add_argument("--quick", action="store_true", help="no paper-plan parameter check (seconds, for tests)")
    return p.parse_args(argv)


def synthetic_degrade(folder: Path, shards: int, per_shard: int, lr: int) -> None:
    """A finished degrade stage folder with `shards` shards of `per_shard` LR/HR pairs (random pixels),
    committed the way the stage commits (markers, manifest)."""
    from dp2o.config import DegradeConfig
    from dp2o.degrade.stage import degrade_schema
    from dp2o.driver import finalize
    from dp2o.plan import ShardSpec, StagePlan
    from dp2o.storage import ShardOutput, Storage, commit_shard, write_parquet
    from dp2o.tario import encode_png, write_tar

    out = Storage(str(folder))
    fp = "0" * 16
    rng = np.random.default_rng(0)
    specs = []
    empty = {f.name: None for f in degrade_schema()}
    for i in range(shards):
        name = f"shard-{i:05d}"
        specs.append(ShardSpec(i, name))
        if (folder / "_markers" / f"{name}.json").exists():
            continue
        rows, members = [], []
        for j in range(per_shard):
            sid = f"img{i:05d}_{j:02d}-00000000-c00"
            rows.append({**empty, "sample_id": sid, "source": f"{sid}.png", "scale": 4, "status": "ok"})
            members.append((f"{sid}.lr.png", encode_png(rng.integers(0, 256, (lr, lr, 3), dtype=np.uint8))))
            members.append(
                (f"{sid}.hr.png", encode_png(rng.integers(0, 256, (4 * lr, 4 * lr, 3), dtype=np.uint8)))
            )
        with out.local_tmpdir() as tmp:
            pq_path, tar_path = Path(tmp) / f"{name}.parquet", Path(tmp) / f"{name}.tar"
            write_parquet(pa.Table.from_pylist(rows, schema=degrade_schema()), pq_path)
            write_tar(tar_path, members)
            files = {f"data/{name}.parquet": str(pq_path), f"data/{name}.tar": str(tar_path)}
            commit_shard(out, ShardOutput(name, files, rows=len(rows)), fingerprint=fp, seconds=0.0)
    finalize(StagePlan("degrade", fp, str(folder), DegradeConfig(), specs))


def run(plan, map_shards) -> dict:
    """Run a plan; wall time and the sum of shard body times (from the markers)."""
    from dp2o.driver import run_stage
    from dp2o.storage import MARKERS

    t0 = time.perf_counter()
    result = run_stage(plan, map_shards)
    wall = time.perf_counter() - t0
    markers = Path(plan.out_url) / MARKERS
    body = sum(json.loads(p.read_text())["seconds"] for p in markers.glob("*.json"))
    return {"wall_s": wall, "body_s": body, "shards": len(plan.shards), "rows": result.manifest["rows"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from dp2o import registry
    from dp2o.config import RayConfig, SampleConfig
    from dp2o.driver import map_locally
    from dp2o.ray_executor import RayExecutor

    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.shards}x{args.inputs_per_shard}x{args.candidates}"
    degrade = args.work / f"degrade-{tag}"
    t0 = time.perf_counter()
    synthetic_degrade(degrade, args.shards, args.inputs_per_shard, args.lr_size)
    setup_s = time.perf_counter() - t0

    cfg = SampleConfig(backend={"kind": "null"}, num_candidates=args.candidates, batch_size=64)
    stage = registry.get("sample")
    tracemalloc.start()
    t0 = time.perf_counter()
    plan = stage.plan(cfg, {"degraded": str(degrade)}, str(args.work / f"sample-ray-{tag}-{time.time_ns()}"))
    plan_s = time.perf_counter() - t0
    plan_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    ray_cfg = RayConfig(num_cpus=args.workers, num_gpus=0, max_workers=args.workers)
    on_ray = run(plan, RayExecutor(ray_cfg))
    n_base = min(args.baseline_shards or args.shards, args.shards)
    base_plan = stage.plan(
        cfg, {"degraded": str(degrade)}, str(args.work / f"sample-local-{tag}-{time.time_ns()}")
    )
    base_plan.shards = base_plan.shards[:n_base]
    local = run(base_plan, map_locally)

    def overhead(r: dict, workers: int) -> float:
        return (r["wall_s"] * workers - r["body_s"]) / r["shards"]

    gpu = json.loads(SAMPLE_GPU.read_text())["sd2"]["ours"]["s_per_candidate"]
    paper_shard_s = args.inputs_per_shard_paper * 32 * gpu
    record = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "plan": {
            "shards": args.shards,
            "inputs_per_shard": args.inputs_per_shard,
            "candidates": args.shards * args.inputs_per_shard * args.candidates,
            "planning_s": plan_s,
            "planner_peak_bytes": plan_peak,
            "synthetic_degrade_setup_s": setup_s,
        },
        "ray": {**on_ray, "workers": args.workers, "overhead_per_shard_s": overhead(on_ray, args.workers)},
        "baseline_local_loop": {**local, "workers": 1, "overhead_per_shard_s": overhead(local, 1)},
        "paper_scale": {
            "assumed_shard": f"{args.inputs_per_shard_paper} LR inputs x 32 candidates",
            "seconds_per_candidate_h100": gpu,
            "source": "benchmarks/results/gpu/sample_gpu.json sd2.ours.s_per_candidate",
            "shard_gpu_s": paper_shard_s,
        },
    }
    record["ray"]["overhead_pct_of_paper_shard"] = 100 * record["ray"]["overhead_per_shard_s"] / paper_shard_s
    record["ray_minus_local_overhead_per_shard_s"] = (
        record["ray"]["overhead_per_shard_s"] - record["baseline_local_loop"]["overhead_per_shard_s"]
    )
    if not args.quick:
        from dp2o.config import PipelineConfig, load_config
        from dp2o.estimate import estimate

        paper = load_config(PipelineConfig, REPO / "dp2o" / "configs" / "paper.yaml")
        largest = max(
            (s["largest_param"] for s in estimate(paper, 30000)["stages"]), key=lambda p: p["json_bytes"]
        )
        record["paper_plan_30k_largest_task_parameter"] = largest
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
