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
import os
import re
import sys
import time
from pathlib import Path

from dp2o import registry, stopping
from dp2o.config import (
    ConfigError,
    PipelineConfig,
    check_storage_options,
    deep_merge,
    load_config,
    parse_overrides,
)
from dp2o.errors import Dp2oError
from dp2o.urls import URLError, check_url

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
        "inspect",
        help="overview of a run root (every stage: status, rows, errors, size), a stage folder's manifest, "
        "or a Parquet file's schema and first rows",
    )
    p.add_argument("target", help="run root, <root>/<stage>, stage folder, or .parquet file (local or URL)")
    p.add_argument("--rows", type=int, default=10, help="rows of a Parquet file to print")
    p.add_argument(
        "--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE"
    )

    p = sub.add_parser(
        "report",
        help="a self-contained HTML page of a run root: stages, sampled inputs with their candidates and pairs, "
        "reward histograms, the loss curve, evaluation results",
    )
    p.add_argument("root", metavar="RUN_ROOT", help="run root (local folder or URL), e.g. runs/demo")
    p.add_argument("--out", help="HTML file to write (local path or URL; default <RUN_ROOT>/report.html)")
    p.add_argument("--inputs", type=_positive_int, default=8, metavar="K", help="inputs to show (default 8)")
    p.add_argument("--evaluate", metavar="DIR", help="a finished evaluate stage folder outside the run root")
    p.add_argument(
        "--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE"
    )

    p = sub.add_parser(
        "prefetch-metrics",
        help="download the IQA weights of a preset or metrics into the local caches (run where there is internet)",
    )
    p.add_argument("metrics", help="preset (paper, offline) or comma-separated metric names")

    p = sub.add_parser(
        "verify",
        help="re-hash every file (and tar member) a stage folder's markers list; --repair withdraws bad shards",
    )
    p.add_argument("target", help="stage folder (or <root>/<stage> holding one finished run)")
    p.add_argument(
        "--repair",
        action="store_true",
        help="withdraw the marker of every bad shard (and the stale manifest) so the next run recomputes only those",
    )
    p.add_argument(
        "--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE"
    )
    return ap


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return n


def _storage_options(items: list[str]) -> dict:
    so = parse_overrides(items, flag="--storage-option", example="endpoint_url=http://localhost:9000")
    try:
        check_storage_options(so, "--storage-option")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return so


#: config fields the common flags set, for messages that name the field: field -> flag
_COMMON_FLAGS = {"shard_index": "--shard-index", "num_shards": "--num-shards", "ray.address": "--ray-address"}


def _pipeline_config(args, extra: dict | None = None, flags: dict[str, str] | None = None) -> PipelineConfig:
    """The run's config from --config, --set and the flags; every malformed value raises ConfigError (or
    URLError) naming the field and the flag that set it, before anything heavy is imported or any work starts.

    flags: dotted config field -> the command-line flag that set it (stage shortcuts such as --crop-size)."""
    overrides = deep_merge(parse_overrides(args.overrides), extra or {})
    root = getattr(args, "root", None)
    if root is not None:
        check_url(root, "--root", output=True)
        overrides["root"] = root
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
    try:
        return load_config(PipelineConfig, args.config, overrides)
    except ConfigError as e:
        given = {**_COMMON_FLAGS, **(flags or {})}
        used = [
            f"  ({field} was given by {flag})"
            for field, flag in given.items()
            if re.search(rf"\b{re.escape(field.rsplit('.', 1)[-1])}\b", str(e)) and _flag_used(args, flag)
        ]
        if used:
            raise ConfigError("\n".join([str(e), *used])) from None
        raise


def _flag_used(args, flag: str) -> bool:
    dest = {"--shard-index": "shard_index", "--num-shards": "num_shards", "--ray-address": "ray_address"}
    if flag in dest:
        return getattr(args, dest[flag], None) is not None
    return True  # stage shortcuts are passed in `flags` only when given


def _check_folder(url: str, what: str, storage_options: dict, *, output: bool) -> None:
    """Before any work: `url` is a well-formed location; an output folder is not a file and can be created
    where it is local; a remote one's server answers and its bucket exists. Raises URLError/Dp2oError naming
    `what` (the flag or config field)."""
    check_url(url, what, output=output, extra_schemes=() if output else ("bundled",))
    if url.startswith("bundled://"):
        from dp2o.data import BUNDLED_PHOTOS

        split = url[len("bundled://") :].strip("/")
        if split not in (*BUNDLED_PHOTOS, "all"):
            choices = ", ".join(f"bundled://{s}" for s in [*BUNDLED_PHOTOS, "all"])
            raise URLError(f"{what}: unknown bundled photo set {split!r} in {url!r}; use one of {choices}")
        return
    from dp2o.storage import Storage

    st = Storage(url, storage_options)
    if st.local:
        if not output:
            return
        path = Path(st.path)
        if path.exists() and not path.is_dir():
            raise URLError(f"{what}: {url!r} is a file, not a folder; choose a folder for the stage outputs")
        parent = next((p for p in [path, *path.parents] if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise URLError(f"{what}: {url!r} is inside {str(parent)!r}, which is a file, not a folder")
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise URLError(f"{what}: cannot create {url!r}: {str(parent)!r} is not writable")
        return
    _probe_remote(st, what)


def _probe_remote(st, what: str) -> None:
    """One quick request to a remote folder's server (S3: its bucket, one attempt, no retries), so a wrong
    endpoint or a missing bucket is one line in seconds instead of a traceback after minutes of retries."""
    fs, path = st.fs, st.path
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    try:
        if {"s3", "s3a"} & set(protocols):
            opts = dict(st.storage_options)
            config_kwargs = dict(opts.get("config_kwargs") or {})
            config_kwargs.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
            config_kwargs.setdefault("connect_timeout", 5)
            probe = type(fs)(**{**opts, "config_kwargs": config_kwargs, "skip_instance_cache": True})
            bucket = path.split("/", 1)[0]
            try:
                probe.info(bucket)
            except FileNotFoundError:
                raise Dp2oError(
                    f"{what}: bucket {bucket!r} of {st.url!r} does not exist{_endpoint_of(st)}; create it first"
                ) from None
            except PermissionError:
                pass  # credentials that may write under a prefix without seeing the bucket: let the run try
        else:
            fs.exists(path)
    except Dp2oError:
        raise
    except Exception as e:
        text = _storage_error(e)
        if text is None:
            raise
        raise Dp2oError(f"{what}: cannot reach {st.url!r}{_endpoint_of(st)}: {text}") from None


def _endpoint_of(st) -> str:
    so = st.storage_options
    ep = so.get("endpoint_url") or (so.get("client_kwargs") or {}).get("endpoint_url")
    ep = ep or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" at {ep}" if ep else ""


#: packages whose exceptions are storage (network, credentials, service) errors rather than bugs
_STORAGE_PACKAGES = {
    "botocore",
    "aiobotocore",
    "aiohttp",
    "s3fs",
    "fsspec",
    "gcsfs",
    "adlfs",
    "urllib3",
    "requests",
}


def _storage_error(e: BaseException) -> str | None:
    """One line for an error of a filesystem or its server (with what to check), None for anything else."""
    package = type(e).__module__.split(".", 1)[0]
    if package not in _STORAGE_PACKAGES and not isinstance(e, OSError | ConnectionError | TimeoutError):
        return None
    name = type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0]
    text = f"{name}: {first}" if first else name
    if "Credentials" in name:
        return (
            f"{text}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment (or an AWS profile), "
            "or --storage-option anon=true for a public bucket"
        )
    if "Connect" in name or "Endpoint" in name or isinstance(e, ConnectionError | TimeoutError):
        return f"{text}; check --storage-option endpoint_url (or AWS_ENDPOINT_URL) and that the server is up"
    if isinstance(e, PermissionError) or "AccessDenied" in first or "Forbidden" in first:
        return (
            f"{text}; check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and their permissions"
        )
    return text


def _flows():
    return importlib.import_module("flows")


def _run_pipeline(
    cfg: PipelineConfig, orchestrator: str, until: str | None = None, root_flag: str = "root"
) -> None:
    _check_folder(cfg.root, root_flag, cfg.storage_options, output=True)
    t0 = time.perf_counter()
    if orchestrator == "prefect":
        flows = _flows()
        flows.run_flow(flows.pipeline, config=cfg, until=until)
        return
    from dp2o.driver import run_pipeline, summary
    from dp2o.report import report_after_run

    results = run_pipeline(cfg, until=until)
    print(summary(results, time.perf_counter() - t0))
    report = report_after_run(cfg.root, cfg.storage_options)
    if report:
        print(f"report: {report}  (open it in a browser; dp2o report {cfg.root} rebuilds it)")


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
    given = {f"{stage.section}.{f.key}": f.flag for f in stage.flags if f.key in flags}
    cfg = _pipeline_config(args, {stage.section: flags} if flags else None, given)
    inputs = {i.name: getattr(args, f"input_{i.name}") for i in stage.inputs}
    so = cfg.storage_options
    for i in stage.inputs:
        if inputs[i.name] is not None:
            _check_folder(inputs[i.name], i.flag, so, output=False)
    _check_folder(args.out, "--out", so, output=True)
    if stage.cli_then and args.then_out:
        _check_folder(args.then_out, f"--{stage.cli_then}-out", so, output=True)
    res = _run_stage(stage, cfg, args.orchestrator, inputs, args.out)
    if stage.cli_then:
        print(json.dumps(res, indent=2, default=str))
        then = registry.get(stage.cli_then)
        then_inputs = {i.name: args.out if i.stage == stage.name else None for i in then.inputs}
        then_out = args.then_out or args.out.rstrip("/") + f"-{then.name}"
        res = _run_stage(then, cfg, args.orchestrator, then_inputs, then_out)
    print(json.dumps(res, indent=2, default=str))


def _inspect(target: str, rows: int, storage_options: dict | None = None) -> None:
    """A run root: one line per stage run; `<root>/<stage>`: its one finished run's manifest (or its runs); a
    stage folder: its manifest; a Parquet file: its schema and first rows."""
    from dp2o.overview import run_line, stage_folders
    from dp2o.storage import MANIFEST, Storage

    so = storage_options or {}
    s = Storage(target, so)
    if not s.fs.isdir(s.path):
        _inspect_parquet(s, rows)
        return
    if s.exists(MANIFEST):
        _print_manifest(s)
        return
    runs = [name for name in s.listdir() if s.exists(name, "config.json")]
    if runs:  # <root>/<stage>: one finished run shows its manifest, several are listed
        done = [r for r in runs if s.exists(r, MANIFEST)]
        if len(runs) == 1 and done:
            _print_manifest(s.child(done[0]))
        else:
            print(f"{s.url}: {len(runs)} runs")
            for r in runs:
                print(run_line(s.child(r)))
        return
    stage_dirs = stage_folders(s)
    if not stage_dirs:
        raise Dp2oError(
            f"{target}: neither a run root, a stage folder nor a <root>/<stage> folder ({MANIFEST})"
        )
    print(f"run root {s.url}")
    for name in stage_dirs:
        folder = s.child(name)
        fps = [r for r in folder.listdir() if folder.exists(r, "config.json")]
        if not fps:
            print(f"  {name:<10} not started")
        for fp in fps:
            print(f"  {name:<10} {run_line(folder.child(fp))}")


def _print_manifest(run) -> None:
    from dp2o.storage import MANIFEST

    m = run.read_json(MANIFEST)
    print(run.url)
    print(
        json.dumps(
            {k: m[k] for k in ("stage", "fingerprint", "rows", "errors", "stats", "upstream")},
            indent=2,
            default=str,
        )
    )
    print(
        f"shards: {len(m['shards'])}; files: " + ", ".join(f for sh in m["shards"][:3] for f in sh["files"])
    )


def _inspect_parquet(s, rows: int) -> None:
    import pyarrow.parquet as pq

    from dp2o.schemas import column_docs

    with s.fs.open(s.path, "rb") as f:
        table = pq.read_table(f)
    meta = table.schema.metadata or {}
    stage = meta.get(b"dp2o.stage", b"?").decode()
    print(
        f"{s.url}: written by stage {stage} (schema version {meta.get(b'dp2o.schema_version', b'?').decode()})"
    )
    docs = column_docs(table.schema)
    width = max((len(f.name) for f in table.schema), default=0)
    for f in table.schema:
        d = docs.get(f.name, {})
        unit = f" [{d['unit']}]" if d.get("unit") else ""
        better = f" ({d['better']} is better)" if d.get("better") else ""
        print(f"  {f.name:<{width}}  {str(f.type):<8} {d.get('description', '')}{unit}{better}")
    print(f"\n{table.num_rows} rows; first {min(rows, table.num_rows)}:")
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 30):
        print(table.slice(0, rows).to_pandas())


def _verify(args) -> int:
    from dp2o.verify import verify_stage

    report = verify_stage(args.target, _storage_options(args.storage_options), repair=args.repair)
    print(report)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage error (naming the flag) or --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    # bitsandbytes (pulled in by peft/diffusers) warns about optional CPU kernels on every import; not ours to fix
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("dp2o").setLevel(logging.INFO)
    if getattr(args, "orchestrator", "local") != "prefect":
        _log_to_terminal()  # under Prefect, its handlers print (and upload) the `dp2o` logger's lines
    try:
        if args.command == "inspect":
            _inspect(args.target, args.rows, _storage_options(args.storage_options))
        elif args.command == "verify":
            return _verify(args)
        elif args.command == "report":
            from dp2o.report import write_report

            so = _storage_options(args.storage_options)
            print(
                write_report(
                    args.root, args.out, inputs=args.inputs, storage_options=so, evaluate=args.evaluate
                )
            )
        elif args.command == "plan":
            from dp2o import estimate

            return estimate.run(args)
        elif args.command == "prefetch-metrics":
            from dp2o.reward.registry import metric_names

            names = args.metrics if "," not in args.metrics else [x.strip() for x in args.metrics.split(",")]
            try:
                metric_names(names)
            except ValueError as e:
                raise ConfigError(f"prefetch-metrics {args.metrics!r}: {e}") from None
            from dp2o.reward.scoring import prefetch_weights

            print(json.dumps(prefetch_weights(names), indent=2))
        elif args.command == "demo":
            if args.config is None:
                args.config = str(DEMO_CONFIG)
            with stopping.on_signals():  # SIGTERM, Ctrl-C: stop at the next batch, keep committed shards
                _run_pipeline(_pipeline_config(args), args.orchestrator, root_flag=_root_flag(args))
        elif args.command == "run":
            with stopping.on_signals():
                _run_pipeline(
                    _pipeline_config(args), args.orchestrator, args.until, root_flag=_root_flag(args)
                )
        else:
            with stopping.on_signals():
                _stage_command(args)
        return 0
    except stopping.Stopped as e:  # 130 (SIGINT), 143 (SIGTERM), 1 (cancelled through the Prefect API)
        print(f"dp2o: {stopping.message(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C
        print("dp2o: interrupted at once; committed shards are kept, rerun to resume", file=sys.stderr)
        return 130
    except Dp2oError as e:
        print(f"dp2o: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError | URLError) else 1
    except FileNotFoundError as e:
        print(f"dp2o: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        text = _storage_error(e)
        if text is None:
            raise  # a bug: keep the traceback
        print(f"dp2o: storage error: {text}", file=sys.stderr)
        return 1


def _root_flag(args) -> str:
    return "--root" if getattr(args, "root", None) is not None else "root"


def _log_to_terminal() -> None:
    """Progress lines of the `dp2o` logger on stderr, one message per line (the library only logs)."""
    logger = logging.getLogger("dp2o")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
