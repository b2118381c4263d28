"""The reward stage: the hybrid reward of every candidate, from a score stage's stored raw metric columns.

It needs the whole dataset at once (dataset-level normalisation bounds), so it runs as one task over every
pending shard, and writes the fitted bounds to `normalization.json` beside the shards. It never re-scores:
changing the reward's weights or normalisation reruns only this stage.
"""

from __future__ import annotations

from pathlib import Path

from dp2o.config import ScoreConfig, canonical, fingerprint
from dp2o.plan import ShardSpec, StagePlan, Upstream, out_url
from dp2o.registry import Input, Stage
from dp2o.reward.registry import metric_names
from dp2o.schemas import Column, documented
from dp2o.storage import ShardOutput, read_parquet, write_parquet

#: the reward column's doc (also in the evaluate stage's candidates table)
REWARD_COLUMN = Column(
    "hybrid reward: each metric normalised to [0, 1] higher-better, then mixed", "", "higher"
)


def plan(cfg: ScoreConfig, inputs, out, *, root, storage_options, runtime) -> StagePlan:
    up = Upstream.at(inputs["scores"], storage_options, "score")
    fp = fingerprint(
        "reward",
        {"metrics": metric_names(cfg.metrics), "reward": canonical(cfg.reward)},
        [up.entry["fingerprint"]],
    )
    return StagePlan(
        "reward",
        fp,
        out_url(out, root, "reward", fp),
        cfg,
        up.shards(),
        upstream={"score": up.entry, **up.lineage},
        storage_options=storage_options,
    )


def run_all(plan: StagePlan, todo: list[ShardSpec], tmp: Path) -> list[ShardOutput]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from dp2o.reward.hybrid import compute_reward
    from dp2o.score.stage import metric_specs

    cfg: ScoreConfig = plan.config
    score_dir = plan.upstream_dir("score")
    tables = []
    for s in plan.shards:
        t = read_parquet(score_dir, f"data/{s.name}.parquet")
        tables.append(t.append_column("_shard", pa.array([s.index] * t.num_rows, pa.int32())))
    full = pa.concat_tables(tables)
    full = full.filter(pc.equal(full["status"], "ok"))
    reward, bounds = compute_reward(full, metric_specs(cfg), cfg.reward)
    full = full.append_column("reward", pa.array(np.asarray(reward, dtype=np.float64)))
    plan.out.write_json_atomic({"bounds": bounds, "reward": canonical(cfg.reward)}, "normalization.json")
    outputs = []
    for s in todo:
        part = documented(
            full.filter(pc.equal(full["_shard"], s.index)).drop_columns(["_shard"]),
            "reward",
            {"reward": REWARD_COLUMN},
        )
        p = tmp / f"{s.name}.parquet"
        write_parquet(part, p)
        r = part["reward"].to_numpy()
        stats = {
            "reward_sum": float(r.sum()),
            "reward_min": float(r.min()) if len(r) else None,
            "reward_max": float(r.max()) if len(r) else None,
        }
        outputs.append(
            ShardOutput(s.name, {f"data/{s.name}.parquet": str(p)}, rows=part.num_rows, stats=stats)
        )
    return outputs


def summarize(m: dict) -> list[str]:
    st, n = m["stats"], m["rows"]
    if not n:
        return []
    return [
        f"reward:  mean {st['reward_sum'] / n:.3f}  min {st['reward_min']:.3f}  "
        f"max {st['reward_max']:.3f}  over {n} candidates"
    ]


def describe(manifest: dict, url: str, storage) -> list[dict]:
    """The reward distribution (a small histogram) and, per metric, its direction, raw range and correlation
    with the reward."""
    from dp2o import charts
    from dp2o import describe as d
    from dp2o.plan import read_stage_table
    from dp2o.score.stage import metric_summary, scored_metric_names

    t = read_stage_table(storage)
    if t.num_rows == 0:
        return []
    reward = t["reward"]
    st = d.summary(reward)
    names = scored_metric_names(manifest, t)
    pictures = [charts.markdown_image("reward", charts.histogram_svg("hybrid reward", reward))] + [
        charts.markdown_image(n, charts.histogram_svg(f"{n} (raw)", t[n], width=240, height=150))
        for n in names
        if n in t.column_names
    ]
    return [
        d.markdown(
            "reward-pictures",
            f"## Reward of {st['count']} candidates\n\n"
            + " ".join(pictures[:1])
            + "\n\n### Raw metrics\n\n"
            + " ".join(pictures[1:]),
            "histograms of the hybrid reward and of each raw metric",
        ),
        d.table(
            "reward-histogram",
            d.histogram(reward),
            f"hybrid reward of {st['count']} candidates: min {st['min']}, mean {st['mean']}, max {st['max']}",
        ),
        d.table(
            "reward-metrics",
            metric_summary(t, names, reward),
            "per metric: direction, raw range and Pearson correlation of the raw score with the reward",
        ),
    ]


STAGE = Stage(
    name="reward",
    version=1,
    config=ScoreConfig,
    section="score",
    inputs=(Input("scores", "score", "--scores", "finished score stage folder"),),
    planner=plan,
    description="recompute the hybrid reward from stored raw scores (no re-scoring)",
    run_all=run_all,
    resources="cpu",
    summarize=summarize,
    describe=describe,
)
