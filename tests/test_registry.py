"""The stage registry is the one list of stages: a stage registered from a test appears in the CLI, the
runner, the summary, both kinds of Prefect flow and the deployments; generic code names no stage; the
driver's per-stage concurrency and the train stage's runtime backend fields (two past bugs) hold."""

from __future__ import annotations

import ast
import dataclasses
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from dp2o import registry
from dp2o.config import PairsConfig, PipelineConfig, fingerprint
from dp2o.plan import ShardSpec, StagePlan, Upstream, out_url, read_stage_table
from dp2o.registry import Flag, Input, Stage
from dp2o.storage import ShardOutput, Storage, shard_name, write_parquet

REPO = Path(__file__).resolve().parents[1]

# ---- a throwaway two-stage pipeline, defined here and nowhere else -----------------------------------------------


def _plan_count(cfg, inputs, out, *, root, storage_options, runtime) -> StagePlan:
    fp = fingerprint("count", cfg, [])
    shards = [ShardSpec(i, shard_name(i), (i,)) for i in range(3)]
    return StagePlan(
        "count", fp, out_url(out, root, "count", fp), cfg, shards, storage_options=storage_options
    )


def _run_count(plan: StagePlan, spec: ShardSpec, tmp: Path) -> ShardOutput:
    n = plan.config.n_top
    p = tmp / f"{spec.name}.parquet"
    write_parquet(pa.table({"shard": [spec.index] * n, "i": list(range(n))}), p)
    return ShardOutput(spec.name, {f"data/{spec.name}.parquet": str(p)}, rows=n, stats={"count_sum": n})


def _plan_tally(cfg, inputs, out, *, root, storage_options, runtime) -> StagePlan:
    up = Upstream.at(inputs["counts"], storage_options, "count")
    fp = fingerprint("tally", cfg, [up.entry["fingerprint"]])
    return StagePlan(
        "tally",
        fp,
        out_url(out, root, "tally", fp),
        cfg,
        [ShardSpec(0, shard_name(0))],
        upstream={"count": up.entry},
        storage_options=storage_options,
    )


def _run_tally(plan: StagePlan, todo: list[ShardSpec], tmp: Path) -> list[ShardOutput]:
    rows = read_stage_table(plan.upstream_dir("count")).num_rows
    p = tmp / "tally.parquet"
    write_parquet(pa.table({"rows": [rows]}), p)
    return [
        ShardOutput(todo[0].name, {f"data/{todo[0].name}.parquet": str(p)}, rows=1, stats={"counted": rows})
    ]


COUNT = Stage(
    name="count",
    version=1,
    config=PairsConfig,
    section="pairs",
    inputs=(),
    planner=_plan_count,
    description="writes n_top rows per shard",
    run_shard=_run_count,
    concurrent=True,
    summarize=lambda m: [f"count:   {m['stats']['count_sum']} rows counted"],
    flags=(Flag("--n-top", "n_top", "rows per shard", int),),
)
TALLY = Stage(
    name="tally",
    version=1,
    config=PairsConfig,
    section="pairs",
    inputs=(Input("counts", "count", "--counts", "finished count stage folder"),),
    planner=_plan_tally,
    description="counts the rows of a count stage",
    run_all=_run_tally,
    summarize=lambda m: [f"tally:   {m['stats']['counted']} rows tallied"],
)


@pytest.fixture
def only_throwaway(monkeypatch):
    """The registry holding just the throwaway stages (the built-in ones are restored afterwards)."""
    registry.stages()  # load the built-in stages first, so they are restored by monkeypatch
    monkeypatch.setattr(registry, "_REGISTRY", {"count": COUNT, "tally": TALLY})


@pytest.fixture
def with_throwaway(monkeypatch):
    """The built-in stages plus the throwaway ones."""
    registry.stages()
    monkeypatch.setattr(registry, "_REGISTRY", {**registry._REGISTRY, "count": COUNT, "tally": TALLY})


def _cfg(root: Path) -> PipelineConfig:
    return PipelineConfig.model_validate({"root": str(root), "pairs": {"n_top": 2}})


def test_a_registered_stage_runs_in_the_local_runner_and_the_summary(tmp_path, only_throwaway):
    from dp2o.driver import run_pipeline, summary

    results = run_pipeline(_cfg(tmp_path))
    assert list(results) == ["count", "tally"]
    assert results["count"].manifest["rows"] == 6 and results["tally"].manifest["stats"]["counted"] == 6
    text = summary(results)
    assert "count:   6 rows counted" in text and "tally:   6 rows tallied" in text
    again = run_pipeline(_cfg(tmp_path))
    assert again["count"].computed == 0 and again["tally"].computed == 0


def test_a_registered_stage_is_a_cli_subcommand(tmp_path, with_throwaway, capsys):
    from dp2o.cli import build_parser, main

    assert "count" in build_parser().format_help() and "tally" in build_parser().format_help()
    out = tmp_path / "c"
    assert main(["count", "--out", str(out), "--n-top", "3", "--orchestrator", "local"]) == 0
    assert read_stage_table(Storage(str(out))).num_rows == 9
    assert main(["tally", "--counts", str(out), "--out", str(tmp_path / "t"), "--orchestrator", "local"]) == 0
    assert '"counted": 9' in capsys.readouterr().out


def test_a_registered_stage_gets_a_deployment(with_throwaway):
    from dp2o.deployments import definitions

    entry = {d["name"]: d["entrypoint"] for d in definitions()["deployments"]}
    assert entry["count"] == "flows/stages.py:count" and entry["tally"] == "flows/stages.py:tally"
    assert {s.name for s in registry.stages()} <= set(entry)


def test_committed_deployments_are_generated_from_the_registry():
    from dp2o.deployments import render

    committed = (REPO / "deploy" / "prefect.yaml").read_text(encoding="utf-8")
    assert committed == render(), (
        "deploy/prefect.yaml is stale: python -m dp2o.deployments > deploy/prefect.yaml"
    )


@pytest.mark.slow
def test_a_registered_stage_runs_as_a_stage_flow_and_in_the_pipeline_flow(
    tmp_path, only_throwaway, prefect_harness
):
    import flows
    from flows.stages import stage_flow

    schema = stage_flow("tally").parameters.model_dump()
    assert {"config", "counts", "out", "workers"} <= set(schema["properties"])
    assert "counts" in schema["required"]
    res = flows.count(config=PairsConfig(n_top=4), out=str(tmp_path / "c"), workers=2)
    assert res["rows"] == 12
    text = flows.pipeline(config=_cfg(tmp_path / "run"))["summary"]
    assert "count:   6 rows counted" in text and "tally:   6 rows tallied" in text


# ---- generic code names no stage -------------------------------------------------------------------------------

#: the code that runs any stage: it must learn about stages from the registry only
GENERIC = [
    *(
        REPO / "dp2o" / f
        for f in ("cli.py", "config.py", "deployments.py", "driver.py", "errors.py", "plan.py")
    ),
    *(
        REPO / "dp2o" / f
        for f in ("storage.py", "schemas.py", "tario.py", "overview.py", "progress.py", "charts.py")
    ),
    *(REPO / "dp2o" / f for f in ("stopping.py",)),
    *sorted((REPO / "flows").glob("*.py")),
    *sorted((REPO / "tasks").glob("*.py")),
]


def test_generic_code_has_no_stage_name_literals():
    """Stage names appear only in the registry's module list and in the stage modules themselves."""
    names = set(registry.names())
    found = []
    for path in GENERIC:
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)


def test_every_stage_module_defines_one_stage_with_a_matching_name():
    for module, stage in zip(registry.BUILTIN, registry.stages(), strict=False):
        assert module == f"dp2o.{stage.name}.stage", (module, stage.name)
        assert (stage.run_shard is None) != (stage.run_all is None)
        assert stage.resources in ("cpu", "gpu")


# ---- the two bugs the registry fixed ---------------------------------------------------------------------------


class _Concurrency:
    """Counts how many calls of a wrapped function overlap in time."""

    def __init__(self):
        self.lock, self.now, self.peak = threading.Lock(), 0, 0

    def wrap(self, fn):
        def wrapped(*args, **kwargs):
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                time.sleep(0.3)  # long enough for a second thread to enter if the executor allows it
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.now -= 1

        return wrapped


@pytest.fixture(scope="module")
def to_pairs(tmp_path_factory):
    from dp2o.driver import run_pipeline
    from tests.helpers import make_hr_folder, tiny_pipeline_config

    base = tmp_path_factory.mktemp("reg")
    hr = make_hr_folder(base / "hr", n=4)  # 2 photos per shard: 2 degrade shards
    cfg = tiny_pipeline_config(str(base / "run"), str(hr), sample={"num_candidates": 2}, pairs={"n_top": 1})
    return cfg, run_pipeline(cfg, until="pairs")


@pytest.mark.slow
def test_sample_shards_never_run_in_threads_even_with_workers(to_pairs, tmp_path, monkeypatch):
    """`dp2o sample --set workers=4` used to run sample shards in threads on one shared backend."""
    from dp2o.cli import main
    from dp2o.models.tiny import TinyBackend

    cfg, results = to_pairs
    probe = _Concurrency()
    monkeypatch.setattr(TinyBackend, "sample", probe.wrap(TinyBackend.sample))
    args = [
        "sample",
        "--input",
        results["degrade"].url,
        "--out",
        str(tmp_path / "s"),
        "--orchestrator",
        "local",
    ]
    args += ["--set", f"sample.backend.model={cfg.sample.backend.model}", "--set", "sample.backend.kind=tiny"]
    args += ["--set", "sample.backend.num_inference_steps=2", "--set", "workers=4"]
    assert main(args) == 0
    assert probe.peak == 1, f"{probe.peak} sample shards ran at once in one process"


@pytest.mark.slow
def test_degrade_shards_do_run_concurrently_when_workers_allow(tmp_path, monkeypatch):
    """The other side of the rule: a stage that allows concurrency gets `workers` threads."""
    import dp2o.degrade.stage as degrade_stage
    from dp2o.config import DegradeConfig
    from dp2o.driver import run_stage
    from tests.helpers import make_hr_folder

    probe = _Concurrency()
    stage = dataclasses.replace(degrade_stage.STAGE, run_shard=probe.wrap(degrade_stage.run_shard))
    registry.stages()
    monkeypatch.setitem(registry._REGISTRY, "degrade", stage)
    hr = make_hr_folder(tmp_path / "hr", n=4)
    cfg = DegradeConfig(input=str(hr), crop_size=96, images_per_shard=1)
    run_stage(stage.plan(cfg, {}, str(tmp_path / "d"), runtime={}), workers=4)
    assert probe.peak > 1


def test_train_gets_the_runtime_backend_fields_of_the_run(to_pairs, monkeypatch):
    """`_run_train` used to rebuild the backend from the sample manifest alone, dropping gradient_checkpointing,
    compile and cpu_offload (runtime fields are not recorded upstream)."""
    import dp2o.models
    from dp2o.driver import run_stage

    cfg, results = to_pairs
    built = []
    real = dp2o.models.build_backend

    def recording(backend_cfg):
        built.append(backend_cfg)
        return real(backend_cfg)

    monkeypatch.setattr(dp2o.models, "build_backend", recording)
    run_cfg = cfg.model_copy(
        update={
            "sample": cfg.sample.model_copy(
                update={
                    "backend": cfg.sample.backend.model_copy(
                        update={"gradient_checkpointing": True, "cpu_offload": True}
                    )
                }
            )
        }
    )
    stage = registry.get("train")
    plan = stage.plan(
        run_cfg.train,
        {"pairs": results["pairs"].url},
        str(Path(results["pairs"].url).parent.parent / "train-rt"),
        runtime=stage.runtime_of(run_cfg),
    )
    assert plan.fingerprint == stage.plan(cfg.train, {"pairs": results["pairs"].url}, runtime={}).fingerprint
    run_stage(plan)
    assert built and built[-1].gradient_checkpointing and built[-1].cpu_offload
    assert built[-1].model == cfg.sample.backend.model  # the recorded base model, not the run's
