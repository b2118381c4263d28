"""A real Prefect server for tests that need one the way users run it (UI, heartbeats, a second process).

    with prefect_server(tmp_path) as server:
        env = server.env()                 # PREFECT_API_URL etc. for a child process
        subprocess.run([...], env=env)
        server.ui("runs/flow-run/<id>")    # a URL of its UI

The server runs `prefect server start` on a free port of 127.0.0.1 with its own PREFECT_HOME (a fresh SQLite
database) and `PREFECT_UI_API_URL` set, so its UI talks to it and not to port 4200. Starting takes 10-30 s; a
busy machine gets `START_TIMEOUT` seconds. The server is stopped (process group) when the block ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

#: seconds the server may take to answer /api/health
START_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    home: Path
    log: Path

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def ui(self, path: str = "") -> str:
        return f"{self.url}/{path.lstrip('/')}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a child process that talks to this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_API_URL=self.api,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            HF_HUB_OFFLINE="1",
        )
        env.update(extra)
        return env


def _prefect() -> list[str]:
    exe = shutil.which("prefect", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "prefect"]


@contextmanager
def prefect_server(tmp: Path) -> Iterator[Server]:
    port = free_port()
    home = Path(tmp) / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    server = Server(f"http://127.0.0.1:{port}", home, Path(tmp) / "prefect-server.log")
    env = server.env(PREFECT_UI_API_URL=server.api, PREFECT_SERVER_API_HOST="127.0.0.1")
    env.pop("PREFECT_API_URL")  # the server itself does not talk to an API
    with open(server.log, "wb") as log:
        proc = subprocess.Popen(
            [*_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited ({proc.returncode}): {server.log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{server.api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not answer within {START_TIMEOUT} s: {server.log}")
            time.sleep(1)
        yield server
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
