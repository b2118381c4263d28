"""Docs that are generated from code stay in sync with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_config_reference_is_current():
    r = subprocess.run(
        [sys.executable, "-m", "scripts.gen_config_docs", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
