"""The `dp2o` command: run the pipeline or any single stage, inspect and verify outputs.

Stages run under Prefect by default (`--orchestrator prefect`: a temporary local API starts when no
PREFECT_API_URL is set, so runs appear in the UI when a server is configured); `--orchestrator local` runs the
same stage functions in a plain loop. This module never imports Prefect at import time: the orchestration
layer (`flows`) is loaded only when asked for.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from dp2o.config import ConfigError, PipelineConfig, deep_merge, load_config, parse_overrides

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
STAGES = ("degrade", "sample", "score", "reward", "pairs", "train")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="pipeline YAML (sections degrade/sample/score/pairs/train); stage commands use their section",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set sample.num_candidates=8 (repeatable)",
    )
    p.add_argument(
        "--orchestrator",
        choices=("prefect", "local"),
        default="prefect",
        help="prefect: run as Prefect flows (default); local: plain loop in this process",
    )
    p.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for s3:// etc., e.g. --storage-option endpoint_url=http://host:9000",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dp2o", description="DP²O-SR preference optimisation pipeline for Real-ISR"
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run", help="run the whole pipeline (degrade → sample → score → reward → pairs → train)"
    )
    _common(p)
    p.add_argument("--root", help="run root URL (local folder or s3://bucket/prefix); default from config")
    p.add_argument("--until", choices=STAGES, help="stop after this stage")

    p = sub.add_parser(
        "demo", help="run the whole pipeline on the bundled photos with the built-in tiny model"
    )
    _common(p)
    p.add_argument("--root", default=None, help="run root (default runs/demo)")

    p = sub.add_parser("degrade", help="HR photos -> LR/HR webdataset shards + Parquet index")
    _common(p)
    p.add_argument(
        "--input", help="HR source: folder, fsspec URL, webdataset .tar shards, or bundled://train"
    )
    p.add_argument("--out", required=True, help="output stage folder")
    p.add_argument("--crop-size", type=int, help="HR crop side (multiple of 4)")

    p = sub.add_parser("sample", help="M candidates per LR input of a degrade stage")
    _common(p)
    p.add_argument("--input", required=True, help="finished degrade stage folder")
    p.add_argument("--out", required=True, help="output stage folder")
    p.add_argument("--num-candidates", type=int, help="M, candidates per LR input")

    p = sub.add_parser("score", help="raw IQA metrics per candidate, then the hybrid reward")
    _common(p)
    p.add_argument("--input", required=True, help="finished sample stage folder")
    p.add_argument("--out", required=True, help="output folder for raw scores")
    p.add_argument("--reward-out", help="output folder for rewards (default: <out>-reward)")
    p.add_argument("--metrics", help="preset (offline, paper) or comma-separated metric names")

    p = sub.add_parser("reward", help="recompute the hybrid reward from stored raw scores (no re-scoring)")
    _common(p)
    p.add_argument("--scores", required=True, help="finished score stage folder")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("pairs", help="top-N x bottom-N preference pairs with HPO weights")
    _common(p)
    p.add_argument(
        "--scores",
        required=True,
        help="reward stage folder, or any Parquet file/folder with sample_id, candidate, reward",
    )
    p.add_argument("--out", required=True, help="output folder (Parquet files under data/)")
    p.add_argument(
        "--n-top", type=int, help="N: top-N winners x bottom-N losers per input (1 = best vs worst)"
    )
    p.add_argument("--weighting", choices=("hpo", "uniform"), help="hierarchical weights or weight 1")

    p = sub.add_parser("train", help="weighted Diffusion-DPO on a pairs stage")
    _common(p)
    p.add_argument("--pairs", required=True, help="finished pairs stage folder")
    p.add_argument(
        "--samples", help="sample stage folder holding the candidates (default: from the pairs' lineage)"
    )
    p.add_argument("--out", required=True, help="output folder (checkpoints/, model/, data/metrics.parquet)")
    p.add_argument("--steps", type=int, help="optimiser steps")

    p = sub.add_parser(
        "inspect", help="print a stage folder's manifest or a Parquet file's schema and first rows"
    )
    p.add_argument("target", help="stage folder or .parquet file/URL")
    p.add_argument("--rows", type=int, default=10)

    p = sub.add_parser(
        "prefetch-metrics",
        help="download the IQA weights of a preset or metrics into the local caches (run where there is internet)",
    )
    p.add_argument("metrics", help="preset (paper, offline) or comma-separated metric names")

    p = sub.add_parser("verify", help="re-hash every file a stage folder's markers list")
    p.add_argument("target", help="stage folder")
    return ap


def _storage_options(items: list[str]) -> dict:
    return parse_overrides(items)


def _pipeline_config(args, extra: dict | None = None) -> PipelineConfig:
    overrides = deep_merge(parse_overrides(args.overrides), extra or {})
    if getattr(args, "root", None):
        overrides["root"] = args.root
    so = _storage_options(getattr(args, "storage_options", []))
    if so:
        overrides["storage_options"] = so
    return load_config(PipelineConfig, args.config, overrides)


def _flows():
    return importlib.import_module("flows")


def _run_pipeline(cfg: PipelineConfig, orchestrator: str, until: str | None = None) -> None:
    t0 = time.perf_counter()
    if orchestrator == "prefect":
        _flows().pipeline(config=cfg, until=until)
        return
    from dp2o.runner import run_pipeline, summary

    results = run_pipeline(cfg, until=until)
    print(summary(results, time.perf_counter() - t0))


def _run_stage(stage: str, cfg: PipelineConfig, orchestrator: str, **urls) -> dict:
    from dp2o import stages

    so = cfg.storage_options
    section = {"reward": cfg.score}.get(stage, getattr(cfg, stage, None))
    if orchestrator == "prefect":
        flow = getattr(_flows(), stage)
        return flow(config=section, storage_options=so, **urls)
    from dp2o.runner import execute_plan

    plan = {
        "degrade": lambda: stages.plan_degrade(section, urls["out"], storage_options=so),
        "sample": lambda: stages.plan_sample(section, urls["degraded"], urls["out"], storage_options=so),
        "score": lambda: stages.plan_score(section, urls["samples"], urls["out"], storage_options=so),
        "reward": lambda: stages.plan_reward(section, urls["scores"], urls["out"], storage_options=so),
        "pairs": lambda: stages.plan_pairs(section, urls["scores"], urls["out"], storage_options=so),
        "train": lambda: stages.plan_train(
            section, urls["pairs"], urls["out"], samples_url=urls.get("samples"), storage_options=so
        ),
    }[stage]()
    return execute_plan(plan, workers=cfg.workers).as_dict()


def _inspect(target: str, rows: int) -> None:
    import pyarrow.parquet as pq

    from dp2o.io import MANIFEST, Storage

    s = Storage(target)
    if s.fs.isdir(s.path):
        if s.exists(MANIFEST):
            m = s.read_json(MANIFEST)
            print(
                json.dumps(
                    {k: m[k] for k in ("stage", "fingerprint", "rows", "errors", "stats", "upstream")},
                    indent=2,
                    default=str,
                )
            )
            print(
                f"shards: {len(m['shards'])}; files: "
                + ", ".join(f for sh in m["shards"][:3] for f in sh["files"])
            )
            return
        raise SystemExit(f"{target}: not a finished stage folder (no {MANIFEST})")
    with s.fs.open(s.path, "rb") as f:
        table = pq.read_table(f)
    print(table.schema)
    print(f"\n{table.num_rows} rows; first {min(rows, table.num_rows)}:")
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 30):
        print(table.slice(0, rows).to_pandas())


def _verify(target: str) -> int:
    from dp2o.io import MANIFEST, Storage, read_marker

    s = Storage(target)
    m = s.read_json(MANIFEST)
    bad = [
        sh["name"]
        for sh in m["shards"]
        if read_marker(s, sh["name"], fingerprint=m["fingerprint"], verify_hash=True) is None
    ]
    print(
        f"{target}: {len(m['shards']) - len(bad)} of {len(m['shards'])} shards verified"
        + (f"; BAD: {bad}" if bad else "")
    )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # bitsandbytes (pulled in by peft/diffusers) warns about optional CPU kernels on every import; not ours to fix
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        if args.command == "inspect":
            _inspect(args.target, args.rows)
            return 0
        if args.command == "verify":
            return _verify(args.target)
        if args.command == "prefetch-metrics":
            from dp2o.reward.scoring import prefetch_weights

            names = args.metrics if "," not in args.metrics else [x.strip() for x in args.metrics.split(",")]
            print(json.dumps(prefetch_weights(names), indent=2))
            return 0
        if args.command == "demo":
            if args.config is None:
                args.config = str(DEMO_CONFIG)
            cfg = _pipeline_config(args)
            _run_pipeline(cfg, args.orchestrator)
            return 0
        if args.command == "run":
            _run_pipeline(_pipeline_config(args), args.orchestrator, args.until)
            return 0
        extra: dict = {}
        if args.command == "degrade":
            if args.input:
                extra = {"degrade": {"input": args.input}}
            if args.crop_size:
                extra.setdefault("degrade", {})["crop_size"] = args.crop_size
            cfg = _pipeline_config(args, extra)
            res = _run_stage("degrade", cfg, args.orchestrator, out=args.out)
        elif args.command == "sample":
            if args.num_candidates:
                extra = {"sample": {"num_candidates": args.num_candidates}}
            cfg = _pipeline_config(args, extra)
            res = _run_stage("sample", cfg, args.orchestrator, degraded=args.input, out=args.out)
        elif args.command == "score":
            if args.metrics:
                m = args.metrics if "," not in args.metrics else [x.strip() for x in args.metrics.split(",")]
                extra = {"score": {"metrics": m}}
            cfg = _pipeline_config(args, extra)
            res = _run_stage("score", cfg, args.orchestrator, samples=args.input, out=args.out)
            print(json.dumps(res, indent=2, default=str))
            reward_out = args.reward_out or args.out.rstrip("/") + "-reward"
            res = _run_stage("reward", cfg, args.orchestrator, scores=args.out, out=reward_out)
        elif args.command == "reward":
            cfg = _pipeline_config(args)
            res = _run_stage("reward", cfg, args.orchestrator, scores=args.scores, out=args.out)
        elif args.command == "pairs":
            pairs = {
                k: v for k, v in {"n_top": args.n_top, "weighting": args.weighting}.items() if v is not None
            }
            cfg = _pipeline_config(args, {"pairs": pairs} if pairs else None)
            res = _run_stage("pairs", cfg, args.orchestrator, scores=args.scores, out=args.out)
        elif args.command == "train":
            if args.steps:
                extra = {"train": {"steps": args.steps}}
            cfg = _pipeline_config(args, extra)
            res = _run_stage(
                "train", cfg, args.orchestrator, pairs=args.pairs, samples=args.samples, out=args.out
            )
        else:  # pragma: no cover - argparse restricts the choices
            raise SystemExit(f"unknown command {args.command}")
        print(json.dumps(res, indent=2, default=str))
        return 0
    except ConfigError as e:
        print(f"dp2o: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from dp2o.models.base import BackendError
        from dp2o.reward.registry import MetricWeightsMissing
        from dp2o.stages import StageError

        if isinstance(e, StageError | FileNotFoundError | BackendError | MetricWeightsMissing):
            print(f"dp2o: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
