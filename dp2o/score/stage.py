"""The score stage: one raw column per IQA metric for every candidate of a sample stage.

Raw scores only; the hybrid reward is a separate stage (`dp2o.reward.stage`) computed from them, so changing
the reward's weights or normalisation never re-runs a metric. The metric models are loaded once per process
and shared by the shards, which therefore run one at a time in a process (`concurrent=False`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pyarrow as pa

from dp2o import stopping
from dp2o.config import ScoreConfig, canonical, fingerprint
from dp2o.plan import ShardSpec, StagePlan, Upstream, out_url
from dp2o.progress import within
from dp2o.registry import Flag, Input, Stage
from dp2o.schemas import documented_schema
from dp2o.storage import ShardOutput, local_copy, read_parquet, write_parquet


def metric_names(cfg: ScoreConfig) -> str | list[str]:
    return cfg.metrics if isinstance(cfg.metrics, str) else list(cfg.metrics)


def metric_specs(cfg: ScoreConfig):
    from dp2o.reward.registry import resolve_metrics

    return resolve_metrics(metric_names(cfg))


@functools.lru_cache(maxsize=2)
def _scorer_cached(metrics_json: str, device: str, batch_size: int):
    from dp2o.reward.registry import resolve_metrics
    from dp2o.reward.scoring import MetricScorer

    return MetricScorer(resolve_metrics(json.loads(metrics_json)), device=device, batch_size=batch_size)


def load_scorer(metrics: str | tuple[str, ...], device: str, batch_size: int):
    """The metric models of a preset or names, loaded once per process for each (metrics, device, batch)."""
    from dp2o.devices import resolve_device

    names = metrics if isinstance(metrics, str) else list(metrics)
    return _scorer_cached(json.dumps(names), str(resolve_device(device)), batch_size)


def scorer(cfg: ScoreConfig):
    """The score stage's metric models, loaded once per process."""
    return load_scorer(cfg.metrics, cfg.device, cfg.batch_size)


def preflight(cfg: ScoreConfig) -> None:
    scorer(cfg)  # loads every metric now: missing weights fail before any image is read


def score_part(cfg: ScoreConfig) -> dict:
    """The part of ScoreConfig that changes raw metric values (the reward settings do not). A preset is
    fingerprinted by the metrics it names, so a change of what a preset holds is a change of fingerprint."""
    from dp2o.reward.registry import metric_names

    c = canonical(cfg)
    c.pop("reward", None)
    c["metrics"] = metric_names(cfg.metrics)
    return c


def score_schema(metric_names: list[str]) -> pa.Schema:
    from dp2o.reward.registry import column_doc

    return documented_schema(
        "score",
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("candidate", pa.int32()),
            pa.field("seed", pa.int64()),
            pa.field("status", pa.string()),
            pa.field("error", pa.string()),
            *[pa.field(m, pa.float64()) for m in metric_names],
        ],
        {m: column_doc(m) for m in metric_names},
    )


def plan(cfg: ScoreConfig, inputs, out, *, root, storage_options, runtime) -> StagePlan:
    up = Upstream.at(inputs["samples"], storage_options, "sample")
    fp = fingerprint("score", score_part(cfg), [up.entry["fingerprint"]])
    return StagePlan(
        "score",
        fp,
        out_url(out, root, "score", fp),
        cfg,
        up.shards(),
        upstream={"sample": up.entry, "degrade": up.lineage["degrade"]},
        storage_options=storage_options,
    )


def run_shard(plan: StagePlan, spec: ShardSpec, tmp: Path) -> ShardOutput:
    from dp2o.sample import candidate_key
    from dp2o.tario import TarReader, to_tensor01

    cfg: ScoreConfig = plan.config
    specs = metric_specs(cfg)
    models = scorer(cfg)
    sample_dir, degrade_dir = plan.upstream_dir("sample"), plan.upstream_dir("degrade")
    cands = read_parquet(sample_dir, f"data/{spec.name}.parquet").to_pylist()
    rows: list[dict] = []
    with (
        TarReader(local_copy(sample_dir, f"data/{spec.name}.tar", tmp)) as sr_tar,
        TarReader(local_copy(degrade_dir, f"data/{spec.name}.tar", tmp)) as hr_tar,
    ):
        by_sample: dict[str, list[dict]] = {}
        for r in cands:
            if r["status"] == "ok":
                by_sample.setdefault(r["sample_id"], []).append(r)
        progress = within(f"score {spec.name}", sum(map(len, by_sample.values())), "candidates")
        for sid, group in progress.over(by_sample.items(), lambda item: len(item[1])):
            stopping.check()
            hr = to_tensor01([hr_tar.image(f"{sid}.hr.png")])
            sr = to_tensor01(sr_tar.image(f"{candidate_key(sid, r['candidate'])}.sr.png") for r in group)
            scores = models.score(sr, hr.expand(len(group), -1, -1, -1))
            for j, r in enumerate(group):
                rows.append(
                    {
                        "sample_id": sid,
                        "candidate": r["candidate"],
                        "seed": r["seed"],
                        "status": "ok",
                        "error": None,
                        **{m.name: float(scores[m.name][j]) for m in specs},
                    }
                )
    table = pa.Table.from_pylist(rows, schema=score_schema([m.name for m in specs]))
    pq_path = tmp / f"{spec.name}.parquet"
    write_parquet(table, pq_path)
    return ShardOutput(spec.name, {f"data/{spec.name}.parquet": str(pq_path)}, rows=len(rows), errors=0)


def metric_summary(table, names: list[str], reward=None) -> list[dict]:
    """One row per metric column of `table`: its direction, raw count/min/mean/max and, given `reward`
    values, Pearson's correlation of the raw column with the reward."""
    from dp2o import describe as d
    from dp2o.reward.registry import METRICS

    rows = []
    for name in names:
        if name not in table.column_names:
            continue
        values = table[name].to_pylist()
        spec = METRICS.get(name)
        direction = "?" if spec is None else ("lower better" if spec.lower_better else "higher better")
        st = d.summary(values)
        row = {"metric": name, "direction": direction, "count": st["count"], "raw_min": st["min"]}
        row |= {"raw_mean": st["mean"], "raw_max": st["max"]}
        if reward is not None:
            row["corr_with_reward"] = d.correlation(values, reward)
        rows.append(row)
    return rows


def scored_metric_names(manifest: dict, table) -> list[str]:
    """The metric columns of a score (or reward) table: the manifest config's metrics, else its float columns."""
    import pyarrow.types as pat

    try:
        return [m.name for m in metric_specs(ScoreConfig.model_validate(manifest["config"]))]
    except Exception:
        fixed = {"sample_id", "candidate", "seed", "status", "error", "reward"}
        return [f.name for f in table.schema if f.name not in fixed and pat.is_floating(f.type)]


def describe(manifest: dict, url: str, storage) -> list[dict]:
    """Per-metric summary of the raw scores (direction, raw range)."""
    from dp2o import describe as d
    from dp2o.plan import read_stage_table

    t = read_stage_table(storage)
    if t.num_rows == 0:
        return []
    rows = metric_summary(t, scored_metric_names(manifest, t))
    return [d.table("metrics", rows, f"raw IQA scores of {t.num_rows} candidates, per metric")]


def metrics_flag(value: str) -> str | list[str]:
    """`--metrics` on the command line: a preset name, or comma-separated metric names."""
    return value if "," not in value else [x.strip() for x in value.split(",")]


STAGE = Stage(
    name="score",
    version=1,
    config=ScoreConfig,
    section="score",
    inputs=(Input("samples", "sample", "--input", "finished sample stage folder"),),
    planner=plan,
    description="raw IQA metrics per candidate, then the hybrid reward",
    run_shard=run_shard,
    concurrent=False,
    resources="gpu",
    preflight=preflight,
    describe=describe,
    flags=(
        Flag("--metrics", "metrics", "preset (offline, paper) or comma-separated metric names", metrics_flag),
    ),
    cli_then="reward",
)
