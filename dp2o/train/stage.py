"""The train stage: weighted Diffusion-DPO of the sampling backend on a pairs stage, one task.

The backend is rebuilt from the sample stage's recorded (canonical) backend config, so training always tunes
the model that made the candidates, plus the runtime-only backend fields of the current run (device,
gradient checkpointing, compile, CPU offload): those are not recorded upstream because they do not change
results, so they come from the run's config through `StagePlan.runtime`. Checkpoints are written under the
stage folder by the training loop as it goes (full state, marker last); the final model and the metrics
table are the stage's one shard. With `train.num_processes > 1` the body trains data-parallel in processes it
spawns itself (`dp2o.train.distributed`); it still returns the one shard, from rank 0.
"""

from __future__ import annotations

from pathlib import Path

from dp2o.config import TrainConfig, fingerprint, runtime_fields
from dp2o.errors import StageError
from dp2o.plan import ShardSpec, StagePlan, Upstream, out_url, read_manifest, read_stage_table
from dp2o.registry import Flag, Input, Stage
from dp2o.schemas import Column, documented
from dp2o.storage import ShardOutput, write_parquet

#: docs of the train metrics table (one row per optimiser step; dp2o.train.losses.dpo_loss defines them)
COLUMNS = {
    "step": Column("optimiser step, from 1"),
    "loss": Column(
        "weighted Diffusion-DPO loss of the step (ln 2 = 0.693 while policy = reference)", "nats", "lower"
    ),
    "implicit_acc": Column(
        "fraction of the step's pairs with a positive implicit reward margin (0.5 = chance)", "", "higher"
    ),
    "lr": Column("learning rate used at this step"),
    "err_w": Column("policy's denoising error on the winners (MSE, mean over pairs)"),
    "err_l": Column("policy's denoising error on the losers (MSE, mean over pairs)"),
    "err_ref_w": Column("frozen reference's denoising error on the winners (same noise and timestep)"),
    "err_ref_l": Column("frozen reference's denoising error on the losers (same noise and timestep)"),
    "reward_margin": Column(
        "mean implicit reward margin -(beta/2) * ((err_w - err_ref_w) - (err_l - err_ref_l))", "", "higher"
    ),
    "weight": Column("mean pair weight of the step"),
    "grad_norm": Column("L2 norm of the gradient before clipping"),
}


def runtime_of(cfg) -> dict:
    """The runtime-only fields of the pipeline's sampling backend (they apply to training the same model)."""
    return {"backend": runtime_fields(cfg.sample.backend)}


def plan(cfg: TrainConfig, inputs, out, *, root, storage_options, runtime) -> StagePlan:
    up = Upstream.at(inputs["pairs"], storage_options, "pairs")
    upstream = {"pairs": up.entry, **up.lineage}
    if inputs.get("samples"):
        samples = Upstream.at(inputs["samples"], storage_options, "sample")
        upstream["sample"] = samples.entry
        upstream["degrade"] = samples.lineage["degrade"]
    if "sample" not in upstream:
        raise StageError(
            f"train: cannot find the sampled candidates for pairs at {inputs['pairs']}; pass --samples"
        )
    fp = fingerprint("train", cfg, [up.entry["fingerprint"], upstream["sample"]["fingerprint"]])
    return StagePlan(
        "train",
        fp,
        out_url(out, root, "train", fp),
        cfg,
        [ShardSpec(0, "train")],
        upstream=upstream,
        storage_options=storage_options,
        runtime=dict(runtime),
    )


def backend_config(plan: StagePlan):
    """The sample stage's recorded backend config plus this run's runtime-only backend fields."""
    from dp2o.models import BackendConfig

    recorded = read_manifest(plan.upstream_dir("sample"))["config"]["backend"]
    return BackendConfig.model_validate({**recorded, **plan.runtime.get("backend", {})})


def run_all(plan: StagePlan, todo: list[ShardSpec], tmp: Path) -> list[ShardOutput]:
    from functools import partial

    from dp2o.train.data import PairImages
    from dp2o.train.distributed import TrainJob, run_training

    cfg: TrainConfig = plan.config
    job = TrainJob(
        backend=backend_config(plan),
        pairs=read_stage_table(plan.upstream_dir("pairs")),
        images=partial(PairImages, plan.upstream_dir("sample"), plan.upstream_dir("degrade")),
        config=cfg,
        out=plan.out,
    )
    # train.num_processes > 1: spawned processes rebuild the backend from `job`; rank 0's outputs come back here
    trained = run_training(job, tmp)
    result, mdir = trained.result, trained.model_dir
    files = {}
    for f in sorted(mdir.rglob("*")):
        if f.name == "config.json":
            _drop_source_path(f)
        if f.is_file():
            files[f"model/{f.relative_to(mdir).as_posix()}"] = str(f)
    mp = tmp / "metrics.parquet"
    write_parquet(documented(result.metrics, "train", COLUMNS), mp)
    files["data/metrics.parquet"] = str(mp)
    return [ShardOutput("train", files, rows=result.metrics.num_rows, stats=result.stats)]


def _drop_source_path(config_json: Path) -> None:
    """diffusers records where a model was loaded from (`_name_or_path`: a folder of this machine, e.g. the
    bundled weights inside this clone); the tuned model's files must not depend on where the base was loaded
    from (its lineage is in the manifest), so every clone writes the same bytes."""
    import json

    data = json.loads(config_json.read_text(encoding="utf-8"))
    if data.pop("_name_or_path", None) is not None:
        config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def summarize(m: dict) -> list[str]:
    st = m["stats"]
    w = st.get("window", 1)
    return [
        f"train:   {st.get('steps')} steps; loss {st.get('loss_first_window'):.4f} -> "
        f"{st.get('loss_last_window'):.4f}, implicit acc {st.get('implicit_acc_last_window'):.3f} "
        f"(means of the first/last {w} steps)",
        f"         tuned model: {m['url']}/model",
    ]


def describe(manifest: dict, url: str, storage) -> list[dict]:
    """Loss and implicit accuracy over the steps (pictures, sparklines and a table of sampled steps) and the
    model."""
    import math

    from dp2o import charts
    from dp2o import describe as d
    from dp2o.storage import read_parquet

    st = manifest.get("stats", {})
    model = f"{url.rstrip('/')}/model"
    rows = read_parquet(storage, "data/metrics.parquet").to_pylist() if manifest.get("rows") else []
    loss = [r.get("loss") for r in rows]
    acc = [r.get("implicit_acc") for r in rows]
    ls, acs = d.summary(loss), d.summary(acc)
    sampled = [
        {
            "step": rows[i].get("step"),
            "loss": rows[i].get("loss"),
            "implicit_acc": rows[i].get("implicit_acc"),
        }
        for i in d.sample_indices(len(rows), 20)
    ]
    steps = [r.get("step") for r in rows]
    loss_svg = charts.line_svg("DPO loss", steps, [("loss", loss)], reference=("ln 2", math.log(2)))
    acc_svg = charts.line_svg("implicit accuracy", steps, [("implicit acc", acc)], reference=("chance", 0.5))
    text = "\n".join(
        [
            f"## Diffusion-DPO training: {len(rows)} logged step(s) of {st.get('steps')}",
            "",
            f"- tuned model: `{model}`",
            f"- pairs: {st.get('pairs')}, beta: {st.get('beta')}, resumed from step: {st.get('resumed_from')}",
            f"- loss: first {d.rounded(st.get('first_loss'))}, final {d.rounded(st.get('final_loss'))} "
            f"(min {ls['min']}, max {ls['max']})",
            f"- implicit accuracy: final {d.rounded(st.get('final_implicit_acc'))} "
            f"(min {acs['min']}, max {acs['max']})",
            "",
            charts.markdown_image("loss over steps", loss_svg)
            + " "
            + charts.markdown_image("accuracy", acc_svg),
            "",
            "```",
            f"loss          {d.sparkline(loss)}",
            f"implicit acc  {d.sparkline(acc)}",
            "```",
            "",
            "Sampled steps:",
            "",
            d.markdown_table(sampled),
        ]
    )
    return [
        d.markdown("train-curve", text, "loss and implicit accuracy over the steps"),
        d.link("model", model, "tuned model", "the tuned model folder"),
    ]


STAGE = Stage(
    name="train",
    version=1,
    config=TrainConfig,
    section="train",
    inputs=(
        Input("pairs", "pairs", "--pairs", "finished pairs stage folder"),
        Input(
            "samples",
            None,
            "--samples",
            "sample stage folder holding the candidates (default: from the pairs' lineage)",
            required=False,
        ),
    ),
    planner=plan,
    description="weighted Diffusion-DPO on a pairs stage",
    run_all=run_all,
    resources="gpu",
    summarize=summarize,
    describe=describe,
    runtime_of=runtime_of,
    devices_of=lambda cfg: cfg.num_processes,
    flags=(Flag("--steps", "steps", "optimiser steps", int),),
)
