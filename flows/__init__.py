"""Prefect flows, derived from the stage registry: one per stage (`stage_flow(name)`, or `flows.<name>`) plus
the end-to-end `pipeline`. All logic lives in `dp2o`; flows only plan, map tasks and finalise.

Importing this package gives Prefect's temporary API server more time to start (`STARTUP_TIMEOUT_SECONDS`,
unless PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is set): Prefect's 20 s default is missed on a busy
node (load 10 on 2 cores), and the run then dies before doing any work. It also sets flow-run heartbeats to
every `HEARTBEAT_SECONDS` unless set, for the zombie-run automation of `flows.zombies`. `run_flow` (the CLI's
way in) runs without PREFECT_API_URL on a temporary server of its own (`flows.server`), and turns a stopped
run (`flows.cancel`) into `dp2o.stopping.Stopped`.
"""

import os

#: seconds Prefect's temporary (no-server) API may take to start; Prefect's own default is 20
STARTUP_TIMEOUT_SECONDS = 150
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(STARTUP_TIMEOUT_SECONDS))
# dp2o's progress lines (logger `dp2o`) go to Prefect's run logs and the UI, formatted like Prefect's own
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dp2o")
#: seconds between a flow run's heartbeat events (Prefect's minimum; its default is 180), unless set: the zombie
#: automation (`python -m flows.zombies --apply`) marks a run Crashed once its heartbeats stop
HEARTBEAT_SECONDS = 30
if not {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"} & set(os.environ):
    os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_SECONDS)

import httpx  # noqa: E402

from flows.pipeline import pipeline  # noqa: E402
from flows.stages import stage_flow  # noqa: E402


def run_flow(flow, **parameters):
    """Call a flow; failing to reach Prefect becomes a one-line `Dp2oError` that says what to do, and a run
    that stopped (a signal, a cancel from the UI) raises `dp2o.stopping.Stopped`."""
    from prefect.exceptions import CancelledRun, TerminationSignal

    from dp2o.errors import Dp2oError
    from flows.server import temporary_api

    try:
        with temporary_api():  # without PREFECT_API_URL: a temporary server that a Ctrl-C does not kill
            return flow(**parameters)
    except (TerminationSignal, KeyboardInterrupt, CancelledRun) as e:
        raise _stopped(e) from None
    except RuntimeError as e:
        if "ephemeral Prefect API server" not in str(e):
            raise
        timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
        raise Dp2oError(
            f"Prefect's temporary API server did not start within {timeout} s (a busy machine?): set "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, run `prefect server start` and set "
            "PREFECT_API_URL, or use --orchestrator local"
        ) from None
    except httpx.ConnectError as e:  # a configured PREFECT_API_URL that does not answer
        url = os.environ.get("PREFECT_API_URL", "PREFECT_API_URL")
        raise Dp2oError(
            f"cannot reach the Prefect API at {url} ({e}): start it (prefect server start), unset "
            "PREFECT_API_URL to use a temporary one, or use --orchestrator local"
        ) from None


def _stopped(e: BaseException):
    """The `Stopped` error of a flow run that ended on a stop request (dp2o's, or else the one `e` stands for)."""
    import signal

    from dp2o import stopping
    from flows.cancel import CANCELLED_REASON

    err = stopping.stopped()
    if err is not None:
        return err
    if isinstance(e, KeyboardInterrupt):
        return stopping.Stopped("SIGINT", signal.SIGINT)
    signum = getattr(e, "signal", None)
    if signum is not None:
        return stopping.Stopped(signal.Signals(signum).name, signum)
    return stopping.Stopped(CANCELLED_REASON)


def __getattr__(name: str):
    if name.startswith("_"):
        raise AttributeError(name)
    from dp2o.errors import StageError

    try:
        return stage_flow(name)
    except StageError:
        raise AttributeError(f"module 'flows' has no attribute {name!r}") from None


__all__ = ["HEARTBEAT_SECONDS", "STARTUP_TIMEOUT_SECONDS", "pipeline", "run_flow", "stage_flow"]
