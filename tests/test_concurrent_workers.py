"""Several `dp2o` processes on one run root share the work: `--shard-index i --num-shards n` partitions every
stage's shards, nobody crashes or deletes another's files, every shard is computed once, the last process to
finish a stage writes its manifest, and the outputs equal one process's. Local folder and S3 (moto)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dp2o.storage import Storage
from tests.helpers import make_hr_folder, stage_files, tiny_pipeline_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, root: str, hr: str) -> Path:
    cfg = tiny_pipeline_config(root, hr, degrade={"images_per_shard": 1}, sample={"num_candidates": 2})
    path = tmp_path / f"cfg-{abs(hash(root))}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"storage_options"})))
    return path


def _run_concurrently(config: Path, n: int, env: dict) -> list[subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "dp2o.cli", "run", "--config", str(config), "--orchestrator", "local"]
    cmd += ["--until", "sample", "--num-shards", str(n)]
    procs = [
        subprocess.Popen(
            [*cmd, "--shard-index", str(i)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _computed(runs, stage: str) -> int:
    pattern = re.compile(rf"^{stage}: (\d+) shard\(s\) to compute here", re.M)
    return sum(int(m) for r in runs for m in pattern.findall(r.stderr))


def test_three_processes_share_one_local_folder(tmp_path):
    hr = make_hr_folder(tmp_path / "hr", n=6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = _run_concurrently(_config(tmp_path, str(tmp_path / "shared"), str(hr)), 3, env)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert _computed(runs, "degrade") == 6 and _computed(runs, "sample") == 6  # each shard once
    single = _run_concurrently(_config(tmp_path, str(tmp_path / "single"), str(hr)), 1, env)[0]
    assert single.returncode == 0, single.stderr[-3000:]
    for stage in ("degrade", "sample"):
        (a,) = (tmp_path / "shared" / stage).iterdir()
        (b,) = (tmp_path / "single" / stage).iterdir()
        assert a.name == b.name and (a / "_MANIFEST.json").exists()
        assert stage_files(a) == stage_files(b), stage
        assert not (a / ".tmp").exists()


@pytest.mark.s3
def test_three_processes_share_one_s3_prefix(tmp_path):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        # credentials and endpoint from the environment, as on a cluster (never in the config)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }
        import s3fs

        fs = s3fs.S3FileSystem(
            key="testing", secret="testing", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}
        )
        fs.mkdir("conc")
        hr = make_hr_folder(tmp_path / "hr", n=6)
        runs = _run_concurrently(_config(tmp_path, "s3://conc/run", str(hr)), 3, env)
        for r in runs:
            assert r.returncode == 0, r.stderr[-3000:]
        assert _computed(runs, "degrade") == 6 and _computed(runs, "sample") == 6
        so = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"]},
        }
        for stage in ("degrade", "sample"):
            (fp,) = Storage(f"s3://conc/run/{stage}", so).listdir()
            assert Storage(f"s3://conc/run/{stage}/{fp}", so).exists("_MANIFEST.json")
            assert len(Storage(f"s3://conc/run/{stage}/{fp}", so).listdir("_markers")) == 6
    finally:
        server.stop()
