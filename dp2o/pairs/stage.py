"""The pairs stage: top-N x bottom-N preference pairs with hierarchical weights, from every candidate's reward.

Its input is a finished reward stage folder, or any Parquet file/folder of the user's with `sample_id`,
`candidate`, `reward` (then `upstream` records the URL and a hash of the file list). It needs every group at
once, so it runs as one task and writes one shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dp2o.config import PairsConfig, fingerprint
from dp2o.errors import StageError
from dp2o.plan import (
    ShardSpec,
    StagePlan,
    Upstream,
    find_stage_dir,
    listing_hash,
    out_url,
    parquet_files,
    read_manifest,
    read_stage_table,
)
from dp2o.registry import Flag, Input, Stage
from dp2o.schemas import Column, documented
from dp2o.storage import ShardOutput, Storage, shard_name, write_parquet

SCORE_COLUMNS = ["sample_id", "candidate", "reward"]


#: docs of the pairs table's columns (one row per preference pair; METHOD.md gives the weights' formulas)
COLUMNS = {
    "win": Column("candidate index of the winner: among the top N rewards of its input"),
    "lose": Column("candidate index of the loser: among the bottom N rewards of its input"),
    "reward_win": Column("the winner's reward", "", "higher"),
    "reward_lose": Column("the loser's reward", "", "higher"),
    "w_intra": Column(
        "intra-group weight: this pair's reward gap + 1 - the mean gap of its input (1: uniform)"
    ),
    "w_inter": Column(
        "inter-group weight: its input's reward std + 1 - the mean std over inputs (1: uniform)"
    ),
    "weight": Column("the pair's weight in the DPO loss: w_intra * w_inter"),
    "group_sigma": Column("standard deviation of the rewards of this input's candidates"),
    "group_m": Column("valid (finite-reward) candidates of this input"),
}


def plan(cfg: PairsConfig, inputs, out, *, root, storage_options, runtime) -> StagePlan:
    url = inputs["scores"]
    found = find_stage_dir(url, storage_options)
    if found is not None:
        up = Upstream(found, read_manifest(found))
        entry = up.entry
        upstream = {"reward": entry, **up.lineage}
    else:
        files = parquet_files(url, storage_options)
        entry = {"url": url, "fingerprint": listing_hash(f"{p}|{n}" for p, n in files), "stage": "external"}
        upstream = {"reward": entry}
    _check_groups_fit(cfg, url, _group_sizes(url, found, storage_options))
    fp = fingerprint("pairs", cfg, [entry["fingerprint"]])
    return StagePlan(
        "pairs",
        fp,
        out_url(out, root, "pairs", fp),
        cfg,
        [ShardSpec(0, shard_name(0))],
        upstream=upstream,
        storage_options=storage_options,
    )


def _group_sizes(url: str, found: Storage | None, storage_options: dict):
    """Candidates per input (M of each group) of the scores at `url`, from the `sample_id` column alone; a
    user's Parquet file without the columns pairs needs is refused here, before any output is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if found is not None:
        ids = read_stage_table(found, ["sample_id"])
    else:
        s = Storage(url, storage_options)
        parts = []
        for path, _ in parquet_files(url, storage_options):
            with s.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                missing = [c for c in SCORE_COLUMNS if c not in pf.schema_arrow.names]
                if missing:
                    raise StageError(f"{path}: missing column(s) {missing}; pairs needs {SCORE_COLUMNS}")
                parts.append(pf.read(columns=["sample_id"]))
        ids = pa.concat_tables(parts)
    if ids.num_rows == 0:
        return ids.num_rows, None
    counts = ids.group_by("sample_id").aggregate([("sample_id", "count")]).column("sample_id_count")
    return len(counts), (min(counts.to_pylist()), max(counts.to_pylist()))


def _check_groups_fit(cfg: PairsConfig, url: str, sizes) -> None:
    """2N <= M on the data: with fewer candidates per input than 2 * pairs.n_top every group is skipped and the
    stage would write no pair at all (the config check sees only sample.num_candidates, not a user's table).
    Some groups smaller than 2N (failed candidates) are fine: they are skipped and counted, as documented."""
    groups, m_range = sizes
    if m_range is None:
        return  # no rows at all: nothing to check (the upstream stage reported its own failures)
    lo, hi = m_range
    need = 2 * cfg.n_top
    if hi < need:
        m = f"M={hi}" if lo == hi else f"M from {lo} to {hi}"
        raise StageError(
            f"pairs.n_top={cfg.n_top} needs at least 2*N={need} candidates per input, but the scores in {url} "
            f"have {m} candidates per input ({groups} input(s)), so no pair would be written; lower "
            f"pairs.n_top (--n-top) to at most {max(1, hi // 2)}"
            + ("" if hi >= 2 else ", or score at least 2 candidates per input")
        )


def load_scores_table(url: str, storage_options: dict):
    """sample_id, candidate, reward from a finished reward stage folder or any Parquet file/folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = find_stage_dir(url, storage_options)
    if found is not None:
        return read_stage_table(found, SCORE_COLUMNS)
    s = Storage(url, storage_options)
    parts = []
    for path, _ in parquet_files(url, storage_options):
        with s.fs.open(path, "rb") as f:
            t = pq.read_table(f)
        missing = [c for c in SCORE_COLUMNS if c not in t.column_names]
        if missing:
            raise StageError(f"{path}: missing column(s) {missing}; pairs needs {SCORE_COLUMNS}")
        parts.append(t.select(SCORE_COLUMNS))
    return pa.concat_tables(parts)


def _json_number(v: Any) -> Any:
    """NumPy scalars as Python numbers; NaN (e.g. mu_sigma when no group yields pairs) as null."""
    import numpy as np

    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def run_all(plan: StagePlan, todo: list[ShardSpec], tmp: Path) -> list[ShardOutput]:
    import pyarrow.compute as pc

    from dp2o.pairs.build import build_pairs

    cfg: PairsConfig = plan.config
    scores = load_scores_table(plan.upstream["reward"]["url"], plan.storage_options)
    scores = scores.filter(pc.is_valid(scores["reward"]))
    table, stats = build_pairs(
        scores["sample_id"],  # Arrow column: 10M strings as a NumPy object array would cost seconds
        scores["candidate"].to_numpy(),
        scores["reward"].to_numpy(),
        n_top=cfg.n_top,
        weighting=cfg.weighting,
    )
    name = todo[0].name
    p = tmp / f"{name}.parquet"
    write_parquet(documented(table, "pairs", COLUMNS), p)
    st = {k: _json_number(v) for k, v in stats.to_dict().items()}
    return [ShardOutput(name, {f"data/{name}.parquet": str(p)}, rows=table.num_rows, stats=st)]


def summarize(m: dict) -> list[str]:
    st = m["stats"]
    return [
        f"pairs:   {m['rows']} pairs from {st.get('groups_with_pairs')} of "
        f"{st.get('groups')} groups ({st.get('groups_zero_spread')} zero-spread skipped)"
    ]


#: the manifest's pair statistics, in the order the counts table shows them, with what each means
PAIR_COUNTS = (
    ("groups", "input groups (sample_id) with a finite reward"),
    ("groups_with_pairs", "groups used: at least one pair written"),
    ("groups_zero_spread", "skipped: every candidate of the group has the same reward"),
    ("groups_too_small", "skipped: fewer than 2N scored candidates"),
    ("candidates_nonfinite", "candidates left out: reward NaN or infinite"),
    ("pairs", "pairs written"),
    ("pairs_tied", "pairs whose winner and loser rewards are equal"),
    ("n_top", "N: winners (and losers) per group"),
    ("mu_gap_mean", "mean reward gap of the groups with pairs"),
    ("mu_sigma", "mean reward std of the groups with pairs"),
)


def describe(manifest: dict, url: str, storage) -> list[dict]:
    """Counts (groups used, skipped and why) and the distribution of the pair weights."""
    from dp2o import charts
    from dp2o import describe as d

    st = manifest.get("stats", {})
    counts = [
        {"count": k, "value": d.rounded(st.get(k)), "meaning": why} for k, why in PAIR_COUNTS if k in st
    ]
    out = [d.table("pairs-counts", counts, "groups used and skipped, pairs written")]
    t = read_stage_table(storage, ["weight"]) if manifest.get("rows") else None
    if t is not None and t.num_rows:
        w = t["weight"]
        s = d.summary(w)
        out.append(
            d.table(
                "pairs-weights",
                d.histogram(w),
                f"pair weights ({manifest.get('config', {}).get('weighting', '?')}): {s['count']} pairs, "
                f"min {s['min']}, mean {s['mean']}, max {s['max']}",
            )
        )
        picture = charts.histogram_svg("pair weights", w)
        out.append(
            d.markdown(
                "pairs-picture", charts.markdown_image("pair weights", picture), "pair weight histogram"
            )
        )
    return out


STAGE = Stage(
    name="pairs",
    version=1,
    config=PairsConfig,
    section="pairs",
    inputs=(
        Input(
            "scores",
            "reward",
            "--scores",
            "reward stage folder, or any Parquet file/folder with sample_id, candidate, reward",
        ),
    ),
    planner=plan,
    description="top-N x bottom-N preference pairs with HPO weights",
    run_all=run_all,
    resources="cpu",
    summarize=summarize,
    describe=describe,
    flags=(
        Flag("--n-top", "n_top", "N: top-N winners x bottom-N losers per input (1 = best vs worst)", int),
        Flag("--weighting", "weighting", "hierarchical weights or weight 1", str, ("hpo", "uniform")),
    ),
)
