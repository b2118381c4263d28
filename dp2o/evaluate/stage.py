"""The evaluate stage: the base and the tuned model side by side on a held-out set, Best/Mean/Worst@M.

For every held-out LR input (a degrade stage, or a folder of the user's own images: `dp2o.evaluate.heldout`)
each model samples M candidates with fixed evaluation seeds, derived from (evaluate.seed, sample id,
candidate) — the same seeds for both models — and every candidate is scored with the configured metrics
(full-reference ones only where the input has an HR image). The stage writes one shard:

    data/candidates.parquet  one row per (model, input, candidate): seed, raw metric columns, reward
    data/summary.parquet     per model x statistic (reward, each metric) x Best/Mean/Worst@M: the mean over
                             inputs with a t-interval over inputs, and over photos (sources) when there are
                             two or more; plus `tuned-base` rows, the differences paired per input
    summary.md               the same as markdown tables that name the unit of each interval
    normalization.json       the reward's frozen normalisation bounds (fitted on the base model)

The base model is the backend the tuned model was trained from (train manifest -> sample stage manifest ->
`config.backend`), or without `--model` the run config's `sample.backend`; the tuned model is the same
backend with the train stage's `model/` loaded into it, so only one model is ever in memory.

The design choices a reader would miss:
* The reward's normalisation bounds are fitted on the base model's candidates and frozen for the tuned
  model's (as `dp2o.evaluate.scoring.RewardModel` does), so both are on one scale: re-fitting per model would
  map each model's own spread onto [0, 1], and a model that only narrowed its spread would change its
  reward for that reason alone.
* The intervals here are over *inputs* (and photos), because this stage sees one tuned model; the
  across-training-seed intervals of `dp2o.evaluate.at_m` need several train runs and are built from several
  of these tables. Tuned-minus-base is paired per input: both models see the same inputs and seeds.
* An input without HR gets the no-reference part of the reward alone (FR metric columns are NaN for it);
  when no input has HR, FR metrics are dropped from the preset and the summary says so.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dp2o import stopping
from dp2o.config import EvaluateConfig, canonical, canonical_json, fingerprint, runtime_fields
from dp2o.errors import StageError
from dp2o.evaluate.candidates import (
    SCORE_BATCH,
    evaluation_seed,
    fit_bounds,
    hybrid_reward,
    sample_candidates,
    score_candidates,
)
from dp2o.evaluate.heldout import HeldoutInput, load_heldout, resolve_heldout
from dp2o.evaluate.summary import BASELINE, at_m_summary, summary_markdown
from dp2o.plan import ShardSpec, StagePlan, Upstream, out_url, read_manifest
from dp2o.progress import within
from dp2o.registry import Flag, Input, Stage
from dp2o.score.stage import load_scorer, metrics_flag
from dp2o.storage import ShardOutput, Storage, write_parquet

#: the smallest LR side the stage accepts (diffusion backends downsample several times)
MIN_LR_SIDE = 8


# ---- the stage: models, metrics and the held-out set ------------------------------------------------------------


def runtime_of(cfg) -> dict:
    """The pipeline's sampling backend: the base model when no `--model` is given, and the runtime fields
    (device, offload, ...) applied to the recorded base backend when one is."""
    return {"backend": cfg.sample.backend.model_dump()}


def _runtime_backend_fields(runtime: Mapping) -> dict:
    from dp2o.models import BackendConfig

    keys = set(runtime_fields(BackendConfig()))
    return {k: v for k, v in dict(runtime.get("backend") or {}).items() if k in keys}


def base_backend_config(plan: StagePlan):
    """The base model's BackendConfig: the recorded canonical config plus this run's runtime-only fields."""
    from dp2o.models import BackendConfig

    recorded = plan.upstream["base"]["backend"]
    return BackendConfig.model_validate({**recorded, **_runtime_backend_fields(plan.runtime)})


def _train_upstream(url: str, storage_options: dict) -> tuple[Upstream, dict]:
    """The finished train stage at `url` and the manifest of the sample stage that made its candidates."""
    fix = (
        "pass the folder of a finished train run (<root>/train/<fingerprint>, holding model/ and "
        "_MANIFEST.json), or leave --model out to evaluate the base model alone"
    )
    try:
        up = Upstream.at(url, storage_options, "train")
    except StageError:
        raise StageError(f"evaluate: --model {url} is not a finished train stage folder; {fix}") from None
    stage = up.manifest.get("stage")
    if stage != "train":
        raise StageError(
            f"evaluate: --model {up.dir.url} is a finished {stage} stage folder, not train; {fix}"
        )
    if not up.dir.exists("model"):
        raise StageError(f"evaluate: --model {up.dir.url} has no model/ folder; {fix}")
    sample = up.lineage.get("sample")
    if not sample:
        raise StageError(f"evaluate: the train stage {up.dir.url} records no sample stage; {fix}")
    try:
        sample_manifest = read_manifest(Storage(sample["url"], storage_options))
    except FileNotFoundError:
        raise StageError(
            f"evaluate: the sample stage {sample['url']} that --model {up.dir.url} was trained on is gone; the "
            "base model's backend config is read from its _MANIFEST.json, so restore that folder"
        ) from None
    return up, sample_manifest


def plan(cfg: EvaluateConfig, inputs, out, *, root, storage_options, runtime) -> StagePlan:
    from dp2o.models import BackendConfig

    if cfg.reward.normalization != "dataset":
        raise StageError(
            "evaluate.reward.normalization must be 'dataset': the bounds are fitted on the base model's "
            "candidates and frozen for the tuned model's, which group (per-input) bounds cannot be"
        )
    heldout, items = resolve_heldout(inputs["heldout"], storage_options)
    upstream: dict[str, dict] = {"heldout": heldout}
    if inputs.get("model"):
        up, sample_manifest = _train_upstream(inputs["model"], storage_options)
        upstream["model"] = up.entry
        base = BackendConfig.model_validate(sample_manifest["config"]["backend"])
        upstream["base"] = {
            "url": up.lineage["sample"]["url"],
            "fingerprint": sample_manifest["fingerprint"],
            "stage": "sample",
            "backend": canonical(base),
        }
        if up.lineage.get("degrade", {}).get("fingerprint") == heldout["fingerprint"]:
            heldout["warning"] = "the held-out set is the degrade stage the model was trained on"
        model_fp = up.entry["fingerprint"]
    else:
        if not runtime.get("backend"):
            raise StageError(
                "evaluate: without --model the base model comes from the run config's sample.backend "
                "(runtime['backend']); pass a config, or a train stage folder with --model"
            )
        base = BackendConfig.model_validate(runtime["backend"])
        upstream["base"] = {"url": None, "fingerprint": None, "backend": canonical(base)}
        model_fp = canonical_json(base)
    from dp2o.reward.registry import metric_names

    fingerprinted = {**canonical(cfg), "metrics": metric_names(cfg.metrics)}  # a preset by what it holds
    fp = fingerprint("evaluate", fingerprinted, [heldout["fingerprint"], model_fp])
    return StagePlan(
        "evaluate",
        fp,
        out_url(out, root, "evaluate", fp),
        cfg,
        [ShardSpec(0, "evaluate", items)],
        upstream=upstream,
        storage_options=storage_options,
        runtime=dict(runtime),
    )


def scorer(cfg: EvaluateConfig):
    """The configured metric models, loaded once per process (shared with the score stage's cache)."""
    return load_scorer(cfg.metrics, cfg.device, SCORE_BATCH)


def preflight(cfg: EvaluateConfig) -> None:
    scorer(cfg)  # loads every metric now: missing weights fail before any image is sampled


def _metrics_for(cfg: EvaluateConfig, inputs: list[HeldoutInput]):
    """(metric specs to use, names of FR metrics dropped because no input has HR)."""
    from dp2o.reward.registry import resolve_metrics

    specs = resolve_metrics(cfg.metrics if isinstance(cfg.metrics, str) else list(cfg.metrics))
    if any(x.hr is not None for x in inputs):
        missing_nr = not any(s.kind == "NR" for s in specs)
        without = [x.lr_name for x in inputs if x.hr is None]
        if missing_nr and without:
            raise StageError(
                f"evaluate: {len(without)} held-out input(s) have no HR (e.g. {without[0]}) and the metrics "
                f"{[s.name for s in specs]} are all full-reference; add their HR images, or add no-reference "
                "metrics to evaluate.metrics"
            )
        return specs, []
    dropped = [s.name for s in specs if s.kind == "FR"]
    kept = [s for s in specs if s.kind == "NR"]
    if not kept:
        raise StageError(
            f"evaluate: the held-out set has no HR images and the metrics {dropped} are all full-reference; "
            "add HR images (an hr/ folder beside lr/), or choose no-reference metrics in evaluate.metrics"
        )
    return kept, dropped


def _check_sizes(inputs: list[HeldoutInput], scale: int, specs, *, hr: bool = True) -> list[HeldoutInput]:
    """Refuse LR images too small for the backend or the metrics; crop HR images that exceed scale x LR by
    less than `scale` pixels (an LR made by flooring HR/scale), refuse other HR sizes (hr=False: LR only)."""
    from dataclasses import replace

    out = []
    for x in inputs:
        h, w = x.lr.shape[:2]
        sh, sw = scale * h, scale * w
        need = [s for s in specs if s.kind == "NR" or x.hr is not None]
        bad = [s for s in need if min(sh, sw) < s.min_side or sh % s.side_multiple or sw % s.side_multiple]
        if min(h, w) < MIN_LR_SIDE or bad:
            why = (
                f"metric {bad[0].name!r} needs outputs with sides >= {bad[0].min_side} and multiples of "
                f"{bad[0].side_multiple}, and x{scale} gives {sw}x{sh}"
                if bad
                else f"LR sides must be at least {MIN_LR_SIDE} px"
            )
            raise StageError(
                f"evaluate: held-out LR image {x.lr_name} is {w}x{h}, too small for the backend and metrics ({why}); "
                "use larger LR images, or drop that metric from evaluate.metrics"
            )
        if hr and x.hr is not None and x.hr.shape[:2] != (sh, sw):
            hh, hw = x.hr.shape[:2]
            if hh // scale == h and hw // scale == w:
                x = replace(x, hr=x.hr[:sh, :sw])
            else:
                raise StageError(
                    f"evaluate: HR image {x.hr_name} is {hw}x{hh} but its LR {x.lr_name} is {w}x{h}; the backend "
                    f"upscales x{scale}, so the HR must be {sw}x{sh} (pair the right files, or remove the HR)"
                )
        out.append(x)
    return out


def evaluate_model(
    backend, label: str, inputs: list[HeldoutInput], specs, scorer, *, m, seed, batch
) -> list[dict]:
    """Sample and score M candidates per input with one backend: one row per candidate."""
    import numpy as np
    import torch

    rows: list[dict] = []
    by_size: dict[tuple, list[HeldoutInput]] = {}
    for x in inputs:
        by_size.setdefault(x.lr.shape, []).append(x)
    per_chunk = max(1, (4 * batch) // m)  # inputs per sampling call: bounds the candidates held in memory
    names = [s.name for s in specs]
    chunks = [
        group[lo : lo + per_chunk] for group in by_size.values() for lo in range(0, len(group), per_chunk)
    ]
    progress = within(f"evaluate {label}", len(inputs) * m, "candidates")
    for chunk in progress.over(chunks, lambda chunk: len(chunk) * m):
        stopping.check()
        ids = [x.sample_id for x in chunk]
        try:
            cands = sample_candidates(backend, ids, [x.lr for x in chunk], m, seed, batch)
        except ValueError as e:
            h, w = chunk[0].lr.shape[:2]
            raise StageError(
                f"evaluate: the {backend.name} backend cannot upscale held-out LR images of {w}x{h} "
                f"(e.g. {chunk[0].lr_name}): {e}"
            ) from e
        finite = torch.isfinite(cands).flatten(2).all(dim=2)
        scores = score_candidates(scorer, torch.nan_to_num(cands).clamp(0, 1), [x.hr for x in chunk])
        for i, x in enumerate(chunk):
            for c in range(m):
                ok = bool(finite[i, c])
                rows.append(
                    {
                        "model": label,
                        "sample_id": x.sample_id,
                        "source": x.source,
                        "candidate": c,
                        "seed": evaluation_seed(seed, x.sample_id, c),
                        "has_hr": x.hr is not None,
                        "status": "ok" if ok else "error",
                        "error": None if ok else "model output has NaN/inf values",
                        **{n: float(scores[n][i, c]) if ok else np.nan for n in names},
                    }
                )
    return rows


def candidates_schema(metric_names: Sequence[str]):
    import pyarrow as pa

    from dp2o.reward.registry import column_doc
    from dp2o.reward.stage import REWARD_COLUMN
    from dp2o.schemas import Column, documented_schema

    columns = {
        "model": Column("which model made the candidate: base or tuned"),
        "has_hr": Column("the held-out input has an HR image (full-reference metrics were computed)"),
        **{n: column_doc(n) for n in metric_names},
        "reward": REWARD_COLUMN,
    }
    return documented_schema(
        "evaluate",
        [
            pa.field("model", pa.string()),
            pa.field("sample_id", pa.string()),
            pa.field("source", pa.string()),
            pa.field("candidate", pa.int32()),
            pa.field("seed", pa.int64()),
            pa.field("has_hr", pa.bool_()),
            pa.field("status", pa.string()),
            pa.field("error", pa.string()),
            *[pa.field(n, pa.float64()) for n in metric_names],
            pa.field("reward", pa.float64()),
        ],
        columns,
    )


def _local_model_dir(train_dir: Storage, manifest: dict, tmp: Path) -> Path:
    """The train stage's model/ folder as a local path (downloaded file by file from an object store)."""
    if train_dir.local:
        return Path(train_dir.p("model"))
    dest = tmp / "model"
    for shard in manifest["shards"]:
        for rel in shard["files"]:
            if rel.startswith("model/"):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                train_dir.download(rel, to=target)
    return dest


def _header(plan: StagePlan, inputs: list[HeldoutInput], m: int, specs, dropped: list[str]) -> list[str]:
    held = plan.upstream["heldout"]
    base = plan.upstream["base"]["backend"]
    sources = len({x.source for x in inputs})
    with_hr = sum(x.hr is not None for x in inputs)
    what = "degrade stage" if held["kind"] == "degrade" else "image folder"
    lines = [
        f"- held-out: {held['url']} ({what}): {len(inputs)} inputs from {sources} photos, {with_hr} with HR",
        f"- base model: {base.get('kind')} {base.get('model') or '(bundled weights)'}",
    ]
    if "model" in plan.upstream:
        lines.append(f"- tuned model: {plan.upstream['model']['url']}/model")
    fr = [s.name for s in specs if s.kind == "FR"]
    nr = [s.name for s in specs if s.kind == "NR"]
    lines += [
        f"- M = {m} candidates per input and model, seeds from (evaluate.seed={plan.config.seed}, input, "
        "candidate): the same for both models",
        f"- reward: FR {', '.join(fr) or 'none'}, NR {', '.join(nr) or 'none'} "
        f"(FR weight {plan.config.reward.fr_weight}); normalisation bounds fitted on the base model's "
        "candidates and frozen for the tuned model's",
    ]
    if dropped:
        lines.append(
            f"- no input has HR: full-reference metrics {', '.join(dropped)} were dropped (NR metrics only)"
        )
    elif with_hr < len(inputs):
        lines.append(
            f"- {len(inputs) - with_hr} of {len(inputs)} inputs have no HR: their FR metrics are empty and "
            "their reward is the NR part alone"
        )
    if held.get("hr_unpaired"):
        lines.append(f"- {held['hr_unpaired']} HR image(s) have no LR with the same stem and were ignored")
    if held.get("warning"):
        lines.append(f"- WARNING: {held['warning']}")
    return lines


def run_all(plan: StagePlan, todo: list[ShardSpec], tmp: Path) -> list[ShardOutput]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from dp2o.models import build_backend

    cfg: EvaluateConfig = plan.config
    tmp = Path(tmp)
    inputs = load_heldout(plan.upstream["heldout"], todo[0].inputs, plan.storage_options, tmp)
    specs, dropped = _metrics_for(cfg, inputs)
    _check_sizes(inputs, 1, [], hr=False)  # the LR minimum, before loading any model
    backend = build_backend(base_backend_config(plan))
    inputs = _check_sizes(inputs, backend.scale, specs)
    metric_models = scorer(cfg)
    run = functools.partial(
        evaluate_model,
        backend,
        inputs=inputs,
        specs=specs,
        scorer=metric_models,
        m=cfg.num_candidates,
        seed=cfg.seed,
        batch=cfg.batch_size,
    )
    rows = run("base")
    if "model" in plan.upstream:
        train_dir = Storage(plan.upstream["model"]["url"], plan.storage_options)
        backend.load_trainable(_local_model_dir(train_dir, read_manifest(train_dir), tmp))
        rows += run("tuned")
    names = [s.name for s in specs]
    table = pa.Table.from_pylist([{**r, "reward": None} for r in rows], schema=candidates_schema(names))
    ok = pc.equal(table["status"], "ok")
    base_ok = table.filter(pc.and_(ok, pc.equal(table["model"], BASELINE)))
    if not base_ok.num_rows:
        raise StageError(
            "evaluate: every candidate of the base model failed (NaN/inf outputs); nothing to score"
        )
    bounds = fit_bounds(base_ok, specs, cfg.reward)
    ok_np = ok.to_numpy(zero_copy_only=False)
    reward = np.full(table.num_rows, np.nan)
    reward[ok_np] = hybrid_reward(table.filter(ok), specs, cfg.reward, bounds)
    table = table.set_column(table.schema.get_field_index("reward"), "reward", pa.array(reward, pa.float64()))

    statistics = {"reward": True, **{s.name: not s.lower_better for s in specs}}
    summary = at_m_summary(table.filter(ok), statistics, confidence=cfg.confidence)
    text = summary_markdown(
        summary, confidence=cfg.confidence, header=_header(plan, inputs, cfg.num_candidates, specs, dropped)
    )

    paths = {
        "cand": tmp / "candidates.parquet",
        "sum": tmp / "summary.parquet",
        "md": tmp / "summary.md",
        "norm": tmp / "normalization.json",
    }
    write_parquet(table, paths["cand"])
    write_parquet(summary, paths["sum"])
    paths["md"].write_text(text, encoding="utf-8")
    paths["norm"].write_text(
        json.dumps({"bounds": bounds, "reward": canonical(cfg.reward)}, indent=2, sort_keys=True) + "\n"
    )
    stats = _stats(summary, inputs, cfg, specs, dropped)
    errors = table.num_rows - int(pc.sum(ok).as_py() or 0)
    return [
        ShardOutput(
            todo[0].name,
            {
                "data/candidates.parquet": str(paths["cand"]),
                "data/summary.parquet": str(paths["sum"]),
                "summary.md": str(paths["md"]),
                "normalization.json": str(paths["norm"]),
            },
            rows=table.num_rows,
            errors=errors,
            stats=stats,
        )
    ]


def _stats(summary, inputs, cfg: EvaluateConfig, specs, dropped) -> dict:
    stats: dict[str, Any] = {
        "inputs": len(inputs),
        "sources": len({x.source for x in inputs}),
        "inputs_with_hr": sum(x.hr is not None for x in inputs),
        "num_candidates": cfg.num_candidates,
        "metrics": [s.name for s in specs],
        "fr_dropped": dropped,
    }
    for r in summary.to_pylist():
        if r["statistic"] == "reward":
            key = f"reward_{r['at_m']}_at_m_{r['model'].replace('-', '_minus_')}"
            stats[key] = r["value"]
            if "-" in r["model"]:
                stats[f"{key}_lo"], stats[f"{key}_hi"] = r["lo"], r["hi"]
    return stats


def summarize(m: dict) -> list[str]:
    st = m["stats"]
    if "reward_mean_at_m_base" not in st:
        return []

    def num(x) -> str:
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.4f}"

    line = (
        f"evaluate: {st['inputs']} held-out inputs ({st['sources']} photos), M={st['num_candidates']}; "
        f"reward Mean@M base {st['reward_mean_at_m_base']:.4f}"
    )
    if "reward_mean_at_m_tuned" in st:
        d = "reward_mean_at_m_tuned_minus_base"
        line += (
            f", tuned {st['reward_mean_at_m_tuned']:.4f} (diff {num(st[d])} [{num(st.get(d + '_lo'))}, "
            f"{num(st.get(d + '_hi'))}] over {st['inputs']} inputs)"
        )
    lines = [line]
    if st.get("fr_dropped"):
        lines.append(f"          no HR in the held-out set: FR metrics {st['fr_dropped']} dropped")
    lines.append(f"          tables: {m.get('url', '')}/summary.md")
    return lines


def describe(manifest: dict, url: str, storage) -> list[dict]:
    """The base vs tuned Best/Mean/Worst@M tables (the stage's summary.md) as markdown."""
    from dp2o import describe as d

    if not storage.exists("summary.md"):
        return []
    with storage.open("summary.md", mode="rb") as f:
        text = f.read().decode("utf-8")
    return [d.markdown("evaluate-summary", text, "base vs tuned model: Best/Mean/Worst@M")]


STAGE = Stage(
    name="evaluate",
    version=1,
    config=EvaluateConfig,
    section="evaluate",
    inputs=(
        Input(
            "model",
            None,
            "--model",
            "finished train stage folder (default: evaluate the config's base model alone)",
            required=False,
        ),
        Input(
            "heldout",
            None,
            "--heldout",
            "finished degrade stage folder, or a folder of LR images (or lr/ and hr/ subfolders, paired by stem)",
        ),
    ),
    planner=plan,
    description="base vs tuned model on a held-out set: M candidates per input, scored, Best/Mean/Worst@M",
    run_all=run_all,
    concurrent=False,
    resources="gpu",
    in_pipeline=False,
    preflight=preflight,
    summarize=summarize,
    describe=describe,
    runtime_of=runtime_of,
    flags=(
        Flag("--num-candidates", "num_candidates", "M, candidates per held-out input and model", int),
        Flag("--metrics", "metrics", "preset (offline, paper) or comma-separated metric names", metrics_flag),
    ),
)
