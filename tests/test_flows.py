"""The Prefect layer: the end-to-end flow and a stage flow complete under Prefect's test harness."""

from __future__ import annotations

import pytest

from tests.helpers import make_hr_folder, tiny_pipeline_config

pytestmark = pytest.mark.slow


def test_pipeline_flow_completes_and_rerun_skips(tmp_path, prefect_harness):
    from flows import pipeline

    hr = make_hr_folder(tmp_path / "hr", n=2)
    cfg = tiny_pipeline_config(str(tmp_path / "run"), str(hr))
    state = pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state
    text = state.result()["summary"]
    assert "train" in text and "pairs" in text
    again = pipeline(config=cfg, return_state=True)
    assert again.is_completed()
    rows = {
        line.split()[0]: line.split()[3]
        for line in again.result()["summary"].splitlines()
        if line.split()
        and line.split()[0] in ("degrade", "sample", "score", "reward", "pairs", "train")
        and len(line.split()) > 4
    }
    assert len(rows) == 6, rows
    assert all(shards.startswith("0+") for shards in rows.values()), rows  # nothing recomputed


def test_stage_flow_with_explicit_locations(tmp_path, prefect_harness):
    from dp2o.config import DegradeConfig
    from flows import degrade

    hr = make_hr_folder(tmp_path / "hr", n=2)
    out = tmp_path / "deg"
    res = degrade(config=DegradeConfig(input=str(hr), crop_size=96), out=str(out))
    assert res["rows"] == 2 and res["errors"] == 0
    assert (out / "_MANIFEST.json").exists()


def test_library_never_imports_prefect():
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, dp2o\n"
        "for m in pkgutil.walk_packages(dp2o.__path__, 'dp2o.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deployments_are_accepted_by_prefect_deploy(prefect_harness, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run(
        [*prefect, "work-pool", "create", "dp2o-local", "--type", "process"],
        env=env,
        cwd=repo,
        capture_output=True,
        check=False,
    )
    r = subprocess.run(
        [*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ls = subprocess.run(
        [*prefect, "deployment", "ls"], env=env, cwd=repo, capture_output=True, text=True, check=True
    )
    for name in (
        "dp2o-pipeline/demo",
        "dp2o-pipeline/nightly",
        "degrade/degrade",
        "sample/sample",
        "score/score",
        "reward/reward",
        "pairs/pairs",
        "train/train",
    ):
        assert name in ls.stdout, ls.stdout
