"""Crash safety and messy inputs: SIGKILL mid-stage then rerun equals an uninterrupted run; bad files are rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from dp2o.driver import run_pipeline
from dp2o.errors import StageError
from dp2o.plan import read_stage_table
from dp2o.storage import Storage
from tests.helpers import make_hr_folder, stage_files, tiny_pipeline_config

pytestmark = pytest.mark.slow


def _write_cfg(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _run_cli(cfg_path: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dp2o.cli", "run", "--config", str(cfg_path), "--orchestrator", "local"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_sigkill_mid_stage_then_rerun_matches_uninterrupted(tmp_path):
    hr = make_hr_folder(tmp_path / "hr", n=6)
    # more candidates and training steps widen the windows in which the kill can land
    extra = {"sample": {"num_candidates": 6, "batch_size": 6}, "train": {"steps": 6, "checkpoint_every": 2}}
    clean_cfg = tiny_pipeline_config(str(tmp_path / "clean"), str(hr), **extra)
    killed_cfg = tiny_pipeline_config(str(tmp_path / "killed"), str(hr), **extra)
    clean = run_pipeline(clean_cfg)

    # kill once in the middle of sampling (some shards committed, others not) ...
    proc = _run_cli(_write_cfg(tmp_path / "killed.yaml", killed_cfg))
    sample_root = tmp_path / "killed" / "sample"
    deadline = time.time() + 240
    while time.time() < deadline and not list(sample_root.glob("*/_markers/shard-00000.json")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(sample_root.glob("*/_MANIFEST.json"))

    # ... and once in the middle of training (after a checkpoint, before the end)
    proc = _run_cli(tmp_path / "killed.yaml")
    ckpts = tmp_path / "killed" / "train"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpts.glob("*/checkpoints/step-*/COMPLETE.json")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    resumed = run_pipeline(killed_cfg)
    assert resumed["train"].manifest["stats"]["resumed_from"] > 0
    for stage, r in clean.items():
        a, b = stage_files(Path(r.url)), stage_files(Path(resumed[stage].url))
        assert a.keys() == b.keys(), stage
        for rel in a:
            if rel.endswith(".parquet") and stage == "train":
                ta, tb = pq.read_table(Path(r.url) / rel), pq.read_table(Path(resumed[stage].url) / rel)
                cols = [c for c in ta.column_names if c != "seconds"]  # wall time differs, values must not
                assert ta.select(cols).equals(tb.select(cols)), (stage, rel)
            else:
                assert a[rel] == b[rel], (stage, rel)
    ids = read_stage_table(Storage(resumed["sample"].url), ["sample_id", "candidate"]).to_pylist()
    assert len(ids) == len({(d["sample_id"], d["candidate"]) for d in ids})  # none duplicated


def _messy_folder(folder: Path) -> Path:
    make_hr_folder(folder, n=2)
    rng = np.random.default_rng(0)
    rgb = (rng.random((120, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((120, 120), 128, np.uint8)])).save(folder / "rgba.png")
    good = folder / "gray.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "not_an_image.png").write_text("hello, I am text")
    (folder / "empty.jpg").write_bytes(b"")
    Image.fromarray(rgb[:20, :20]).save(folder / "tiny.png")
    return folder


def test_bad_inputs_become_error_rows(tmp_path):
    hr = _messy_folder(tmp_path / "hr")
    cfg = tiny_pipeline_config(str(tmp_path / "run"), str(hr), degrade={"crops_per_image": 1, "min_size": 96})
    results = run_pipeline(cfg, until="sample")
    table = read_stage_table(Storage(results["degrade"].url))
    by_source = {
        Path(s).name: (st, err)
        for s, st, err in zip(
            table["source"].to_pylist(), table["status"].to_pylist(), table["error"].to_pylist(), strict=True
        )
    }
    for name in ("gray.png", "rgba.png", "photo_00.png", "photo_01.png"):
        assert by_source[name][0] == "ok", by_source[name]
    for name in ("truncated.png", "not_an_image.png", "empty.jpg", "tiny.png"):
        status, err = by_source[name]
        assert status == "error" and err, name
    assert "tiny.png" in by_source["tiny.png"][1]
    assert results["degrade"].manifest["errors"] == 4
    # error rows never reach the sampler
    assert results["sample"].manifest["rows"] == 4 * cfg.sample.num_candidates


def test_too_many_failures_is_a_clear_stage_error(tmp_path):
    hr = _messy_folder(tmp_path / "hr")
    cfg = tiny_pipeline_config(
        str(tmp_path / "run"), str(hr), degrade={"max_failed_fraction": 0.1, "min_size": 96}
    )
    with pytest.raises(StageError, match="max_failed_fraction"):
        run_pipeline(cfg, until="degrade")
