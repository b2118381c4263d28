"""A busy machine: the default orchestrator's temporary Prefect server gets time to start under load, a start
that still times out is one line saying what to do, and scratch left by SIGKILLed runs is reclaimed by the next
run without touching a live writer's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import make_hr_folder

REPO = Path(__file__).resolve().parents[1]


class CpuLoad:
    """`n` processes spinning on the CPU (the artificial load of a shared GPU node)."""

    def __init__(self, n: int = 4):
        self.n = n

    def __enter__(self):
        spin = "while True: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def _degrade_under_prefect(tmp_path: Path, extra_env: dict) -> subprocess.CompletedProcess:
    hr = make_hr_folder(tmp_path / "hr", n=1)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PREFECT_HOME": tempfile.mkdtemp(prefix="dp2o-prefect-busy-"),  # no server of the test session
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **extra_env,
    }
    env.pop("PREFECT_API_URL", None)
    if (
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in extra_env
    ):  # dp2o's default, not an inherited one
        env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    cmd = [sys.executable, "-m", "dp2o.cli", "degrade", "--input", str(hr), "--out", str(tmp_path / "deg")]
    return subprocess.run(
        [*cmd, "--crop-size", "96"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_prefect_run_starts_under_load_with_the_default_timeout(tmp_path):
    with CpuLoad(4):
        r = _degrade_under_prefect(tmp_path, {})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "deg" / "_MANIFEST.json").exists()


@pytest.mark.slow
def test_a_prefect_start_that_times_out_is_one_line_saying_what_to_do(tmp_path):
    with CpuLoad(4):
        r = _degrade_under_prefect(tmp_path, {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"})
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("dp2o: Prefect's temporary API server did not start within 1 s"), r.stderr[-3000:]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in last and "--orchestrator local" in last
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "deg").exists(), "nothing is written before the orchestrator is up"


def test_scratch_of_a_sigkilled_run_is_reclaimed_and_a_live_writers_is_not(tmp_path):
    from dp2o.storage import SCRATCH, Storage, reclaim_scratch, scratch_prefix

    stage = Storage(str(tmp_path / "stage"))
    # a writer that is alive: this process
    with stage.local_tmpdir() as mine:
        # a writer that dies with SIGKILL while holding scratch (local stage folder and system temp)
        code = (
            "import os, sys, time\n"
            "from dp2o.storage import Storage\n"
            f"s = Storage({str(tmp_path / 'stage')!r})\n"
            "remote = Storage('memory://bucket/x')\n"
            "with s.local_tmpdir() as a, remote.local_tmpdir() as b:\n"
            "    open(os.path.join(a, 'shard.tar'), 'wb').write(b'x' * 1000)\n"
            "    open(os.path.join(b, 'shard.tar'), 'wb').write(b'x' * 1000)\n"
            "    print(a, b, flush=True)\n"
            "    time.sleep(600)\n"
        )
        victim = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
        local_dir, temp_dir = victim.stdout.readline().split()
        assert Path(local_dir).exists() and Path(temp_dir).exists()
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        time.sleep(0.1)
        removed = reclaim_scratch(stage)
        assert set(removed) >= {local_dir, temp_dir}
        assert not Path(local_dir).exists() and not Path(temp_dir).exists()
        assert Path(mine).exists(), "a live writer's scratch is never touched"
        assert Path(mine).name.startswith(scratch_prefix())
    reclaim_scratch(stage)
    assert not (tmp_path / "stage" / SCRATCH).exists()
