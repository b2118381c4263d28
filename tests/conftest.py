"""Test-wide settings: offline hub, no Prefect analytics, a private PREFECT_HOME, one CPU thread per test
(DP2O_TEST_TORCH_THREADS to change it)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="dp2o-prefect-home-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402
import torch  # noqa: E402

#: torch threads per test process (1 by default; DP2O_TEST_TORCH_THREADS=2/4 runs the suite with more, to show no
#: test depends on one kernel's summation order)
torch.set_num_threads(int(os.environ.get("DP2O_TEST_TORCH_THREADS", "1")))


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (starting one costs ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
