"""The temporary Prefect API of a CLI run without PREFECT_API_URL, started in its own session.

Prefect starts its own temporary server (a uvicorn child process) in the caller's process group, so a Ctrl-C in
the terminal, which signals the whole foreground group, kills the server too: the run can then no longer record
its end, and its API calls retry for minutes (measured: `dp2o run` did not exit within 180 s of a Ctrl-C).
`temporary_api()` starts the same server (`create_app(ephemeral=True)`, the same database under PREFECT_HOME)
in a session of its own, points this process at it for the duration of the run, and stops it at exit, after
Prefect has sent its last logs and events. The server also ends when this process dies (SIGKILL included),
so no server is left behind.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: the server process: Prefect's temporary server app, ended when its parent (the dp2o process) is gone
_SERVER = """
import ctypes, os, sys, threading, time
parent = int(sys.argv[2])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG: SIGTERM when the parent dies
except Exception:
    pass
def watch():
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
if os.getppid() != parent:
    sys.exit(0)
import uvicorn
from prefect.server.api.server import create_app
uvicorn.run(create_app(ephemeral=True, final=True), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="error", lifespan="on")
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Send Prefect's pending logs and events, then stop the server."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
    except Exception:
        pass
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def temporary_api() -> Iterator[str | None]:
    """Inside: PREFECT_API_URL is set (as it was, or to a temporary server of this process). Yields the
    temporary server's API URL, or None when PREFECT_API_URL was already set."""
    import httpx
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        yield None
        return
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(port), str(os.getpid())], env=env, start_new_session=True
    )
    atexit.register(_stop, proc)  # after Prefect's own exit handlers, registered later, have sent their data
    url = f"http://127.0.0.1:{port}/api"
    timeout = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"Timed out while attempting to connect to ephemeral Prefect API server: it exited with "
                    f"code {proc.returncode}"
                )
            try:
                if client.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                _stop(proc)
                raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server")
            time.sleep(0.2)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url
