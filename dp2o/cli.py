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

from dp2o import registry
from dp2o.config import ConfigError, PipelineConfig, deep_merge, load_config, parse_overrides
from dp2o.errors import Dp2oError

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


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
        "--executor",
        choices=("local", "ray"),
        help="where shards run: local (this process; default) or ray (a Ray cluster: see --ray-address)",
    )
    p.add_argument(
        "--ray-address", help="Ray cluster address (ray://host:10001, or auto); default: start Ray locally"
    )
    p.add_argument(
        "--shard-index",
        type=int,
        help="with --num-shards N: this process computes only shards i, i+N, ... (several processes, one folder)",
    )
    p.add_argument("--num-shards", type=int, help="number of processes sharing the stages' shards")
    p.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for s3:// etc., e.g. --storage-option endpoint_url=http://host:9000",
    )


def _add_stage_command(sub, stage: registry.Stage) -> None:
    """A subcommand for one registered stage: its inputs, --out, and its config shortcuts."""
    p = sub.add_parser(stage.name, help=stage.description)
    _common(p)
    for i in stage.inputs:
        p.add_argument(i.flag, dest=f"input_{i.name}", metavar="URL", required=i.required, help=i.help)
    p.add_argument("--out", required=True, help="output stage folder")
    if stage.cli_then:
        p.add_argument(
            f"--{stage.cli_then}-out",
            dest="then_out",
            help=f"output folder of {stage.cli_then} (default: <out>-{stage.cli_then})",
        )
    for f in stage.flags:
        p.add_argument(
            f.flag, dest=f"flag_{f.key}", metavar=f.key.upper(), type=f.type, choices=f.choices, help=f.help
        )
    p.set_defaults(stage=stage.name)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dp2o", description="DP²O-SR preference optimisation pipeline for Real-ISR"
    )
    sub = ap.add_subparsers(dest="command", required=True)

    chain = " → ".join(s.name for s in registry.pipeline_stages())
    p = sub.add_parser("run", help=f"run the whole pipeline ({chain})")
    _common(p)
    p.add_argument("--root", help="run root URL (local folder or s3://bucket/prefix); default from config")
    p.add_argument(
        "--until", choices=[s.name for s in registry.pipeline_stages()], help="stop after this stage"
    )

    p = sub.add_parser(
        "demo", help="run the whole pipeline on the bundled photos with the built-in tiny model"
    )
    _common(p)
    p.add_argument("--root", default=None, help="run root (default runs/demo)")

    for stage in registry.stages():
        _add_stage_command(sub, stage)

    p = sub.add_parser(
        "plan",
        help="estimate a run before starting it: per stage shards, items, GPU-hours, cost, storage, task runs",
    )
    p.add_argument("--config", help="pipeline YAML (e.g. dp2o/configs/paper.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    from dp2o import estimate

    estimate.add_arguments(p)

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
    runtime = {
        "executor": getattr(args, "executor", None),
        "shard_index": getattr(args, "shard_index", None),
        "num_shards": getattr(args, "num_shards", None),
    }
    overrides.update({k: v for k, v in runtime.items() if v is not None})
    if getattr(args, "ray_address", None) is not None:
        overrides = deep_merge(overrides, {"ray": {"address": args.ray_address}})
    so = _storage_options(getattr(args, "storage_options", []))
    if so:
        overrides["storage_options"] = so
    return load_config(PipelineConfig, args.config, overrides)


def _flows():
    return importlib.import_module("flows")


def _run_pipeline(cfg: PipelineConfig, orchestrator: str, until: str | None = None) -> None:
    t0 = time.perf_counter()
    if orchestrator == "prefect":
        flows = _flows()
        flows.run_flow(flows.pipeline, config=cfg, until=until)
        return
    from dp2o.driver import run_pipeline, summary

    results = run_pipeline(cfg, until=until)
    print(summary(results, time.perf_counter() - t0))


def _run_stage(stage: registry.Stage, cfg: PipelineConfig, orchestrator: str, inputs: dict, out: str) -> dict:
    section = getattr(cfg, stage.section)
    runtime = stage.runtime_of(cfg) if stage.runtime_of else {}
    so = cfg.storage_options
    if orchestrator == "prefect":
        flows = _flows()
        return flows.run_flow(
            flows.stage_flow(stage.name),
            config=section,
            out=out,
            storage_options=so,
            workers=cfg.workers,
            runtime=runtime,
            executor=cfg.executor,
            ray=cfg.ray,
            shard_index=cfg.shard_index,
            num_shards=cfg.num_shards,
            **inputs,
        )
    from dp2o.driver import executor_for, partition_of, run_stage

    plan = stage.plan(section, inputs, out, storage_options=so, runtime=runtime)
    return run_stage(plan, executor_for(cfg), workers=cfg.workers, partition=partition_of(cfg)).as_dict()


def _stage_command(args) -> None:
    """Run a stage subcommand (and the stage the CLI runs after it, e.g. reward after score)."""
    stage = registry.get(args.stage)
    flags = {f.key: getattr(args, f"flag_{f.key}") for f in stage.flags}
    flags = {k: v for k, v in flags.items() if v is not None}
    cfg = _pipeline_config(args, {stage.section: flags} if flags else None)
    inputs = {i.name: getattr(args, f"input_{i.name}") for i in stage.inputs}
    res = _run_stage(stage, cfg, args.orchestrator, inputs, args.out)
    if stage.cli_then:
        print(json.dumps(res, indent=2, default=str))
        then = registry.get(stage.cli_then)
        then_inputs = {i.name: args.out if i.stage == stage.name else None for i in then.inputs}
        then_out = args.then_out or args.out.rstrip("/") + f"-{then.name}"
        res = _run_stage(then, cfg, args.orchestrator, then_inputs, then_out)
    print(json.dumps(res, indent=2, default=str))


def _inspect(target: str, rows: int) -> None:
    import pyarrow.parquet as pq

    from dp2o.storage import MANIFEST, Storage

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
        raise Dp2oError(f"{target}: not a finished stage folder (no {MANIFEST})")
    with s.fs.open(s.path, "rb") as f:
        table = pq.read_table(f)
    print(table.schema)
    print(f"\n{table.num_rows} rows; first {min(rows, table.num_rows)}:")
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 30):
        print(table.slice(0, rows).to_pandas())


def _verify(target: str) -> int:
    from dp2o.storage import MANIFEST, Storage, read_marker

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
    _log_to_terminal()
    try:
        if args.command == "inspect":
            _inspect(args.target, args.rows)
        elif args.command == "verify":
            return _verify(args.target)
        elif args.command == "plan":
            from dp2o import estimate

            return estimate.run(args)
        elif args.command == "prefetch-metrics":
            from dp2o.reward.scoring import prefetch_weights

            names = args.metrics if "," not in args.metrics else [x.strip() for x in args.metrics.split(",")]
            print(json.dumps(prefetch_weights(names), indent=2))
        elif args.command == "demo":
            if args.config is None:
                args.config = str(DEMO_CONFIG)
            _run_pipeline(_pipeline_config(args), args.orchestrator)
        elif args.command == "run":
            _run_pipeline(_pipeline_config(args), args.orchestrator, args.until)
        else:
            _stage_command(args)
        return 0
    except Dp2oError as e:
        print(f"dp2o: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except FileNotFoundError as e:
        print(f"dp2o: {e}", file=sys.stderr)
        return 1


def _log_to_terminal() -> None:
    """Progress lines of the `dp2o` logger on stderr, one message per line (the library only logs)."""
    logger = logging.getLogger("dp2o")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
