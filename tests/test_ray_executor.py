"""The Ray executor on a local Ray instance that declares 2 logical GPUs: each GPU shard runs on its own
device, a model is loaded once per worker (not per shard), outputs are byte-identical to the local executor's,
a worker SIGKILLed mid-shard is replaced and its shard retried with nothing partial visible, and a shard that
always fails fails the stage by name while every other shard stays committed; a stop request kills the running
shards and starts no more."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dp2o import registry
from dp2o.config import PairsConfig, RayConfig, fingerprint
from dp2o.driver import run_pipeline, run_stage
from dp2o.errors import StageError
from dp2o.plan import ShardSpec, StagePlan, out_url, pending_shards
from dp2o.registry import Stage
from dp2o.storage import MANIFEST, ShardOutput, shard_name, write_parquet
from tests.helpers import make_hr_folder, stage_files, tiny_pipeline_config

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the module: 2 CPUs and 2 logical GPUs (placement is real, CUDA is not)."""
    if ray.is_initialized():
        ray.shutdown()
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


# ---- a throwaway GPU stage that reports where it ran and counts its model loads --------------------------------

_MODEL: dict = {}


def _load_model(log: str) -> int:
    """Stands in for loading weights: once per process, recorded in `log`."""
    if "pid" not in _MODEL:
        _MODEL["pid"] = os.getpid()
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
    return _MODEL["pid"]


def _plan(cfg, inputs, out, *, root, storage_options, runtime) -> StagePlan:
    fp = fingerprint("probe", cfg, [])
    shards = [ShardSpec(i, shard_name(i)) for i in range(6)]
    return StagePlan("probe", fp, out_url(out, root, "probe", fp), cfg, shards, runtime=dict(runtime))


def _run(plan: StagePlan, spec: ShardSpec, tmp: Path) -> ShardOutput:
    rt = plan.runtime
    _load_model(rt["loads"])
    (tmp / "partial.bin").write_bytes(b"half a shard")  # what a killed worker leaves in its scratch
    if spec.name == rt.get("kill") and not Path(rt["killed"]).exists():
        Path(rt["killed"]).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.name == rt.get("fail"):
        raise ValueError("model exploded")
    time.sleep(rt.get("sleep", 0))  # a long shard
    p = tmp / f"{spec.name}.parquet"
    write_parquet(pa.table({"shard": [spec.index], "value": [spec.index * plan.config.n_top]}), p)
    where = {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
    return ShardOutput(
        spec.name, {f"data/{spec.name}.parquet": str(p)}, rows=1, stats={"where_" + spec.name: where}
    )


PROBE = Stage(
    name="probe",
    version=1,
    config=PairsConfig,
    section="pairs",
    inputs=(),
    planner=_plan,
    description="reports its device, counts model loads",
    run_shard=_run,
    resources="gpu",
    in_pipeline=False,
)


@pytest.fixture
def probe(monkeypatch, tmp_path):
    registry.stages()
    monkeypatch.setitem(registry._REGISTRY, "probe", PROBE)
    runtime = {"loads": str(tmp_path / "loads.txt"), "killed": str(tmp_path / "killed")}
    return lambda out, **extra: PROBE.plan(PairsConfig(n_top=3), {}, str(out), runtime={**runtime, **extra})


def _loads(plan) -> list[str]:
    return Path(plan.runtime["loads"]).read_text().split()


def test_each_gpu_shard_gets_its_own_device_and_the_model_loads_once_per_worker(tmp_path, probe):
    from dp2o.ray_executor import RayExecutor

    plan = probe(tmp_path / "out")
    result = run_stage(plan, RayExecutor(RayConfig()))
    stats = result.manifest["stats"]
    where = [stats[f"where_{shard_name(i)}"] for i in range(6)]
    assert all(len(w["gpu_ids"]) == 1 and w["cuda"] == w["gpu_ids"][0] for w in where), where
    assert {w["gpu_ids"][0] for w in where} == {"0", "1"}  # both logical GPUs used, one per worker
    assert len(_loads(plan)) == 2, "one load per GPU worker, not one per shard (6)"


def test_a_killed_worker_is_replaced_and_its_shard_retried_with_nothing_partial_left(tmp_path, probe):
    from dp2o.ray_executor import RayExecutor

    clean = probe(tmp_path / "clean", loads=str(tmp_path / "clean-loads.txt"))
    run_stage(clean, RayExecutor(RayConfig()))
    plan = probe(tmp_path / "killed", kill="shard-00001")
    result = run_stage(plan, RayExecutor(RayConfig(max_retries=1)))
    assert Path(plan.runtime["killed"]).exists(), "the worker must really have been killed"
    assert result.manifest["rows"] == 6
    assert stage_files(tmp_path / "killed") == stage_files(tmp_path / "clean")
    listed = {f for s in result.manifest["shards"] for f in s["files"]}
    assert {
        p.relative_to(tmp_path / "killed").as_posix() for p in (tmp_path / "killed" / "data").iterdir()
    } == listed
    assert not (tmp_path / "killed" / ".tmp").exists(), "the dead worker's scratch is reclaimed"


def test_a_stop_request_kills_the_running_shards_and_starts_no_more(tmp_path, probe):
    from dp2o import stopping
    from dp2o.ray_executor import RayExecutor

    plan = probe(tmp_path / "out", sleep=60)
    stopping.clear()
    threading.Timer(8.0, stopping.request, args=("test",)).start()  # the actors are running their shards
    t0 = time.monotonic()
    try:
        with pytest.raises(stopping.Stopped):
            run_stage(plan, RayExecutor(RayConfig()))
    finally:
        stopping.clear()
    assert time.monotonic() - t0 < 20
    assert len(pending_shards(plan)) == 6 and not list((tmp_path / "out" / "data").glob("*"))


def test_a_shard_that_always_fails_fails_the_stage_by_name_and_the_rest_stay_committed(tmp_path, probe):
    from dp2o.ray_executor import RayExecutor

    plan = probe(tmp_path / "out", fail="shard-00002")
    with pytest.raises(StageError, match=r"shard-00002: ValueError: model exploded") as e:
        run_stage(plan, RayExecutor(RayConfig(max_retries=1)))
    assert "after 2 attempt(s)" in str(e.value)
    assert [s.name for s in pending_shards(plan)] == ["shard-00002"]
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_pipeline_on_ray_writes_the_same_bytes_as_the_local_executor(tmp_path):
    hr = make_hr_folder(tmp_path / "hr", n=4)
    local = tiny_pipeline_config(str(tmp_path / "local"), str(hr), sample={"num_candidates": 2})
    on_ray = local.model_copy(update={"root": str(tmp_path / "ray"), "executor": "ray"})
    # degrade (CPU workers) and sample (GPU workers, one model load each): both kinds of actor; score would add
    # only minutes of metric loading on a loaded 2-core machine
    a = run_pipeline(local, until="sample")
    b = run_pipeline(on_ray, until="sample")
    for stage in ("degrade", "sample"):
        assert a[stage].manifest["fingerprint"] == b[stage].manifest["fingerprint"]
        assert stage_files(Path(a[stage].url)) == stage_files(Path(b[stage].url)), stage


def test_cli_runs_a_stage_on_ray(tmp_path, capsys):
    from dp2o.cli import main

    hr = make_hr_folder(tmp_path / "hr", n=2)
    out = tmp_path / "deg"
    args = ["degrade", "--input", str(hr), "--out", str(out), "--crop-size", "96", "--orchestrator", "local"]
    assert main([*args, "--executor", "ray"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2
    assert pq.read_table(out / "data" / "shard-00000.parquet").num_rows == 2


def test_stage_flow_runs_on_ray_under_prefect(tmp_path, probe, prefect_harness):
    from flows.stages import stage_flow

    plan = probe(tmp_path / "x")
    res = stage_flow("probe")(
        config=PairsConfig(n_top=3),
        out=str(tmp_path / "x"),
        runtime=plan.runtime,
        executor="ray",
        ray=RayConfig(),
    )
    assert res["rows"] == 6 and res["computed"] == 6
    assert len(_loads(plan)) == 2
