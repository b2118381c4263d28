"""Stopping (issue 14 item 5): SIGTERM and Ctrl-C stop a run within seconds keeping only committed shards, a
rerun resumes to the bytes of an uninterrupted run; under Prefect the run ends Crashed (SIGTERM) or Cancelled
(Ctrl-C, a cancel from the UI/API), also on the temporary server; a SIGKILLed run is marked Crashed by the
zombie automation; the pipeline flow's per-stage record is persisted and read back through the API."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dp2o import stopping
from tests.helpers import make_hr_folder, stage_files, tiny_pipeline_config

REPO = Path(__file__).resolve().parents[1]
#: the issue's bound on an idle machine, for a stop to end the process
STOP_SECONDS = 30
#: sample shards of a few seconds each (4 candidates in batches of 2, 20 denoising steps): a stop lands mid-shard
SLOW_SAMPLE = {
    "degrade": {"images_per_shard": 1, "crops_per_image": 1},
    "sample": {"num_candidates": 4, "batch_size": 2, "backend": {"num_inference_steps": 20}},
}


@pytest.fixture(autouse=True)
def _fresh_stop_flag():
    stopping.clear()
    yield
    stopping.clear()


# ---- the stop flag, in this process ------------------------------------------------------------------------


def test_a_signal_requests_a_stop_and_check_raises_it():
    # whatever handlers the process had (an earlier test's ray.init installs its own SIGTERM handler) come back
    term_before, int_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stopping.on_signals():
        stopping.check()  # nothing requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert stopping.requested()
        with pytest.raises(stopping.Stopped) as e:
            stopping.check()
        assert e.value.exit_code == 143 and "SIGTERM" in str(e.value)
        os.kill(os.getpid(), signal.SIGTERM)  # Prefect re-sends the SIGTERM it handled: no escalation
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is term_before  # restored
    stopping.clear()
    with stopping.on_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stopping.stopped().exit_code == 130
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is int_before
    assert stopping.Stopped("cancelled").exit_code == 1


def test_no_shard_starts_after_a_stop_and_running_ones_stop_at_their_next_check():
    from dp2o.driver import map_locally

    started: list[int] = []
    release = threading.Event()

    def shard(spec, i):
        started.append(i)
        if i == 0:
            stopping.request("test")
        release.wait(0.2)
        stopping.check()  # the body's next batch boundary
        return {"rows": 1}

    plan = SimpleNamespace(stage="t")
    for concurrency in (1, 2):
        stopping.clear()
        started.clear()
        with pytest.raises(stopping.Stopped):
            map_locally(shard, [(plan, i) for i in range(20)], concurrency)
        assert started[0] == 0 and len(started) <= concurrency, started


def test_the_tiny_backend_stops_within_one_denoising_step():
    import torch

    from dp2o.models.tiny import TinyBackend
    from tests.helpers import TEST_UNET

    backend = TinyBackend.from_random(seed=0, unet_config=TEST_UNET, num_inference_steps=50)
    calls = []
    original = backend._eps

    def eps(*args):
        calls.append(1)
        if len(calls) == 3:
            stopping.request("test")
        return original(*args)

    backend._eps = eps
    with pytest.raises(stopping.Stopped):
        backend.sample(torch.rand(1, 3, 16, 16), [0])
    assert len(calls) == 3  # the fourth step never ran


@pytest.mark.slow
def test_a_stop_ends_data_parallel_training_and_its_processes(tmp_path):
    import multiprocessing

    from dp2o.storage import Storage
    from dp2o.train.distributed import run_training
    from tests.test_train_ddp import job

    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / "step-000001" / "COMPLETE.json"
    requested = []

    def stop_after_the_first_checkpoint():
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        requested.append(time.monotonic())
        stopping.request("test")

    threading.Thread(target=stop_after_the_first_checkpoint, daemon=True).start()
    with pytest.raises(stopping.Stopped):  # 2 ranks, a second per micro-batch: step 2 is under way
        run_training(job(Storage(str(out)), 2, 2, delay=1.0), tmp_path / "scratch")
    assert checkpoint.exists() and time.monotonic() - requested[0] < 10
    assert not multiprocessing.active_children()
    assert not (out / "checkpoints" / "step-000002" / "COMPLETE.json").exists()


# ---- a run in a subprocess ---------------------------------------------------------------------------------


def _write_cfg(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _env(**extra) -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DP2O_PROGRESS": "lines",
    }
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def _start(cfg_path: Path, orchestrator: str, env: dict, until: str = "sample") -> subprocess.Popen:
    """`dp2o run` in its own session (so a signal to its group does not reach pytest)."""
    cmd = [sys.executable, "-m", "dp2o.cli", "run", "--config", str(cfg_path), "--until", until]
    return subprocess.Popen(
        [*cmd, "--orchestrator", orchestrator],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _markers(root: Path, stage: str) -> list[Path]:
    return sorted((root / stage).glob("*/_markers/*.json"))


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, sig: int, *, group: bool = False) -> tuple[int, float, str]:
    """Send `sig` (to the process group: a Ctrl-C in a terminal); (exit status, seconds to exit, stderr)."""
    t0 = time.monotonic()
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=STOP_SECONDS + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(
            f"{signal.Signals(sig).name}: the run did not stop within {STOP_SECONDS + 60} s: {err[-3000:]}"
        )
    return proc.returncode, time.monotonic() - t0, err


def _assert_only_committed_files(root: Path) -> None:
    """Every data file under the run root is a file of a committed shard, with its marker's bytes."""
    for stage_dir in sorted(p.parent for p in root.glob("*/*/config.json")):
        committed = {}
        for m in (stage_dir / "_markers").glob("*.json"):
            committed.update(json.loads(m.read_text())["files"])
        for f in sorted((stage_dir / "data").rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(stage_dir).as_posix()
            assert rel in committed, f"{rel} of {stage_dir} belongs to no committed shard"
            assert hashlib.sha256(f.read_bytes()).hexdigest() == committed[rel]["sha256"], rel


def _assert_stopped(rc: int, seconds: float, err: str, sig: int) -> None:
    assert rc == 128 + sig, (rc, err[-3000:])
    assert seconds < STOP_SECONDS, f"{signal.Signals(sig).name} took {seconds:.1f} s"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"dp2o: stopped ({signal.Signals(sig).name})"), err[-3000:]
    assert "rerun the same command to resume" in last and "sample: " in last, last


@pytest.mark.slow
def test_sigterm_and_ctrl_c_stop_a_local_run_and_a_rerun_resumes_to_the_same_bytes(tmp_path):
    hr = make_hr_folder(tmp_path / "hr", n=4)
    root = tmp_path / "stopped"
    cfg = tiny_pipeline_config(str(root), str(hr), **SLOW_SAMPLE)
    cfg_path = _write_cfg(tmp_path / "run.yaml", cfg)

    proc = _start(cfg_path, "local", _env())
    _wait_for(proc, lambda: _markers(root, "sample"), "first sample shard")
    rc, seconds, err = _stop(proc, signal.SIGTERM)
    _assert_stopped(rc, seconds, err, signal.SIGTERM)
    _assert_only_committed_files(root)
    done = len(_markers(root, "sample"))
    assert 1 <= done < 4 and not list(root.glob("sample/*/_MANIFEST.json"))

    # again, resumed, with a Ctrl-C (the whole process group, as a terminal sends it) once one more shard commits
    proc = _start(cfg_path, "local", _env())
    _wait_for(proc, lambda: len(_markers(root, "sample")) > done, "another sample shard")
    rc, seconds, err = _stop(proc, signal.SIGINT, group=True)
    _assert_stopped(rc, seconds, err, signal.SIGINT)
    _assert_only_committed_files(root)
    assert not list(root.glob("*/*/.tmp/*")), "a stopped shard's scratch is removed"

    from dp2o.driver import run_pipeline

    resumed = run_pipeline(cfg, until="sample")
    assert resumed["sample"].skipped >= done + 1
    clean = run_pipeline(cfg.model_copy(update={"root": str(tmp_path / "clean")}), until="sample")
    for stage in ("degrade", "sample"):
        a, b = stage_files(Path(clean[stage].url)), stage_files(Path(resumed[stage].url))
        assert a.keys() == b.keys() and a == b, stage


# ---- under Prefect -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server (its services run the zombie automation; a temporary one would die with the run)."""
    from tests.prefect_server import prefect_server as real_server

    with real_server(tmp_path_factory.mktemp("server")) as server:
        yield server.api


def _client(url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(url)


def _pipeline_run(url: str, root: Path):
    """The dp2o-pipeline flow run of `root` on the server (None until it exists)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with _client(url) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["dp2o-pipeline"])))
    mine = [r for r in runs if (r.parameters.get("config") or {}).get("root") == str(root)]
    return mine[0] if mine else None


def _subflow_runs(url: str, parent_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with _client(url) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )


def _sample_started(root: Path):
    return lambda: list(root.glob("sample/*/config.json"))


def _prefect_run(tmp_path: Path, name: str, env: dict) -> tuple[Path, subprocess.Popen]:
    hr = make_hr_folder(tmp_path / "hr", n=4)
    root = tmp_path / name
    cfg_path = _write_cfg(tmp_path / f"{name}.yaml", tiny_pipeline_config(str(root), str(hr), **SLOW_SAMPLE))
    return root, _start(cfg_path, "prefect", env)


def _wait_state(url: str, root: Path, final: set[str], timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        run = _pipeline_run(url, root)
        if run is not None and run.state is not None and run.state.type.value in final:
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"the flow run is {run and run.state}, not one of {final}, after {timeout} s")
        time.sleep(1)


@pytest.mark.slow
def test_under_prefect_sigterm_stops_the_run_and_it_ends_crashed(tmp_path, prefect_server):
    root, proc = _prefect_run(tmp_path, "sigterm", _env(PREFECT_API_URL=prefect_server))
    _wait_for(proc, lambda: _markers(root, "sample"), "first sample shard")
    rc, seconds, err = _stop(proc, signal.SIGTERM)
    _assert_stopped(rc, seconds, err, signal.SIGTERM)
    _assert_only_committed_files(root)
    run = _wait_state(prefect_server, root, {"CRASHED", "CANCELLED"}, timeout=10)
    assert run.state.type.value == "CRASHED", run.state
    assert {r.state.type.value for r in _subflow_runs(prefect_server, run.id)} <= {"COMPLETED", "CRASHED"}


@pytest.mark.slow
def test_under_prefect_a_cancel_from_the_ui_stops_the_work_and_the_run_ends_cancelled(
    tmp_path, prefect_server
):
    from prefect.states import Cancelling

    root, proc = _prefect_run(tmp_path, "cancel", _env(PREFECT_API_URL=prefect_server))
    _wait_for(proc, _sample_started(root), "sample stage")
    run = _pipeline_run(prefect_server, root)
    t0 = time.monotonic()
    with _client(prefect_server) as client:  # what the UI's Cancel button does
        client.set_flow_run_state(run.id, Cancelling())
    try:
        _, err = proc.communicate(timeout=STOP_SECONDS + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a cancel from the API did not stop the run")
    seconds = time.monotonic() - t0
    assert proc.returncode == 1 and seconds < STOP_SECONDS, (proc.returncode, seconds, err[-3000:])
    assert "cancelled from the Prefect UI or API" in err.strip().splitlines()[-1], err[-3000:]
    _assert_only_committed_files(root)
    assert not list(root.glob("sample/*/_MANIFEST.json"))
    run = _wait_state(prefect_server, root, {"CANCELLED"}, timeout=10)
    sample = [r for r in _subflow_runs(prefect_server, run.id) if r.name.startswith("sample-")]
    assert sample and sample[0].state.type.value == "CANCELLED", sample


@pytest.mark.slow
def test_ctrl_c_of_a_run_on_the_temporary_server_ends_it_cancelled(tmp_path):
    """No PREFECT_API_URL: a Ctrl-C reaches the whole process group, and the temporary server must outlive it
    long enough for the run to record its end (it did not: the run hung on API retries for minutes)."""
    home = tmp_path / "prefect-home"
    root, proc = _prefect_run(tmp_path, "ctrl-c", _env(PREFECT_HOME=str(home)))
    _wait_for(proc, lambda: _markers(root, "sample"), "first sample shard")
    rc, seconds, err = _stop(proc, signal.SIGINT, group=True)
    _assert_stopped(rc, seconds, err, signal.SIGINT)
    _assert_only_committed_files(root)
    with sqlite3.connect(home / "prefect.db") as db:  # the temporary server's database, read after it stopped
        states = dict(db.execute("select name, state_type from flow_run where parent_task_run_id is null"))
    assert list(states.values()) == ["CANCELLED"], states


@pytest.mark.slow
def test_a_sigkilled_run_is_marked_crashed_by_the_zombie_automation(tmp_path, prefect_server):
    from flows import HEARTBEAT_SECONDS
    from flows.zombies import NAME, apply

    within = HEARTBEAT_SECONDS + 15  # the shortest safe window: Prefect's minimum heartbeat is 30 s
    env = _env(PREFECT_API_URL=prefect_server)
    r = subprocess.run(
        [sys.executable, "-m", "flows.zombies", "--apply", "--within", str(within)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "created automation" in r.stdout, r.stdout + r.stderr
    again = subprocess.run(  # idempotent: the same automation, updated
        [sys.executable, "-m", "flows.zombies", "--apply", "--within", str(within)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "updated automation" in again.stdout, again.stdout + again.stderr
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        apply(within)  # and from Python
        with _client(prefect_server) as client:
            assert len(client.read_automations_by_name(NAME)) == 1

    root, proc = _prefect_run(tmp_path, "zombie", env)
    _wait_for(proc, _sample_started(root), "sample stage")
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    run = _pipeline_run(prefect_server, root)
    assert run.state.type.value == "RUNNING", run.state  # nothing in the dead process could say otherwise
    run = _wait_state(
        prefect_server, root, {"CRASHED", "COMPLETED", "FAILED", "CANCELLED"}, timeout=within + 60
    )
    assert run.state.type.value == "CRASHED" and "heartbeat" in run.state.message, run.state
    took = time.monotonic() - killed
    assert took <= within + 30, took
    subflows = _subflow_runs(prefect_server, run.id)
    deadline = time.monotonic() + 30
    while any(r.state.type.value == "RUNNING" for r in subflows) and time.monotonic() < deadline:
        time.sleep(1)
        subflows = _subflow_runs(prefect_server, run.id)
    assert {r.state.type.value for r in subflows} <= {"COMPLETED", "CRASHED"}, [r.state for r in subflows]


# ---- the pipeline flow's record ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_pipeline_flow_returns_a_persisted_per_stage_record(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows import pipeline
    from flows.artifacts import artifact_key

    hr = make_hr_folder(tmp_path / "hr", n=2)
    cfg = tiny_pipeline_config(str(tmp_path / "run"), str(hr))
    state = pipeline(config=cfg, until="pairs", return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:  # read back from the API, as the UI does
        fetched = client.read_flow_run(state.state_details.flow_run_id).state
        key = artifact_key("pipeline", cfg.root, "result")
        [table] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    record = fetched.result()
    assert table.type == "table" and [r["stage"] for r in json.loads(table.data)] == list(record["stages"])
    assert list(record["stages"]) == ["degrade", "sample", "score", "reward", "pairs"]
    for name, st in record["stages"].items():
        assert st["status"] == "finished" and st["rows"] > 0 and st["errors"] >= 0, (name, st)
        assert st["url"].endswith(st["fingerprint"]) and st["shards"] >= 1 and st["seconds"] >= 0
    assert "dp2o run summary" in record["summary"] and record["wall_seconds"] > 0
    # persisted as JSON in Prefect's local result storage (under PREFECT_HOME unless configured)
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    stored = [json.loads(p.read_text()) for p in Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()).glob("*")]
    assert record in stored  # a readable JSON file; shard tasks and stage subflows persist nothing
