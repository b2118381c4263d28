"""The demo's results are pinned: its stage fingerprints on every run of the suite, and (opt-in, below) every
output file of a full demo run to its sha256.

History of the pin: the stage registry (commit 3ad15d5 -> 93c7cf4) moved code and changed no fingerprint and no
byte. Since then, on purpose: the tuned model's config.json no longer records the folder its base was loaded
from; every Parquet file carries column docs in its metadata (bytes of every table, no fingerprint); and the
`offline` metric preset swapped PIQE for BRISQUE, with presets fingerprinted by the metrics they hold (new
score, reward, pairs and train fingerprints; degrade and sample unchanged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dp2o.config import PipelineConfig, load_config
from dp2o.driver import StageResult, run_pipeline
from dp2o.storage import MANIFEST, Storage

REPO = Path(__file__).resolve().parents[1]
#: `python -m scripts.pin_outputs <root>` of `dp2o demo --orchestrator local --root <root>` at the commit that
#: last changed a result on purpose (see the module doc)
PINNED = REPO / "tests" / "data" / "demo_outputs.json"
#: the demo's stage fingerprints (`make demo` config), as pinned with its output files
FINGERPRINTS = {s: v["fingerprint"] for s, v in json.loads(PINNED.read_text()).items()}


def _plan_only(plan) -> StageResult:
    """An executor that runs nothing: it writes the manifest a finished stage would have (no shards), so the
    next stage can be planned from it."""
    manifest = {
        "stage": plan.stage,
        "fingerprint": plan.fingerprint,
        "upstream": plan.upstream,
        "shards": [{"name": s.name, "files": {}, "rows": 0, "errors": 0} for s in plan.shards],
        "config": {},
        "rows": 0,
        "errors": 0,
        "stats": {},
    }
    Storage(plan.out_url).write_json_atomic(manifest, MANIFEST)
    return StageResult(plan.stage, plan.out_url, manifest, 0, 0, 0.0)


def test_demo_fingerprints_are_pinned(tmp_path, monkeypatch):
    import dp2o.driver

    monkeypatch.setattr(dp2o.driver, "preflight", lambda cfg, until=None: None)  # no model loading needed
    cfg = load_config(PipelineConfig, REPO / "dp2o" / "configs" / "demo.yaml", {"root": str(tmp_path)})
    results = run_pipeline(cfg, _plan_only)
    assert {s: r.manifest["fingerprint"] for s, r in results.items()} == FINGERPRINTS


@pytest.mark.skipif(
    os.environ.get("DP2O_PIN_OUTPUTS") != "1",
    reason="a full demo run (minutes); its bytes depend on the CPU's float kernels, so it is meaningful on the "
    "machine that recorded the pin: DP2O_PIN_OUTPUTS=1 pytest tests/test_demo_pin.py",
)
def test_demo_outputs_are_byte_identical_to_the_pin(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "dp2o.cli", "demo", "--orchestrator", "local", "--root", str(tmp_path)]
    subprocess.run(run, check=True, env=env, cwd=REPO, capture_output=True)
    check = [sys.executable, "-m", "scripts.pin_outputs", str(tmp_path), "--check", str(PINNED)]
    proc = subprocess.run(check, env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
