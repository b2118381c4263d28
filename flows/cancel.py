"""Stopping under Prefect: the bridge between Prefect's ways of stopping a flow run and dp2o's stop flag.

`stoppable(fn)` runs a flow function so that

- a cancel from the UI or the API (the flow run's state becomes Cancelling) stops the work: a watcher thread
  polls the flow run's state every `POLL_SECONDS` and requests dp2o's stop. A flow run started in-process
  (`dp2o run`, a plain call of the flow) has no worker or runner listening for cancels, so without it the run
  stays Cancelling while its shards go on;
- Prefect's termination signal (its SIGTERM handler raises `TerminationSignal` in the flow's thread) or a
  KeyboardInterrupt also requests dp2o's stop before it unwinds the flow: the task runner's exit waits for the
  shards running in its threads, which now stop at their next check instead of running to the end;
- a `Stopped` error from the work ends the flow run Cancelled, with the one-line message saying what was
  committed (a SIGTERM that Prefect itself handled ends it Crashed, as Prefect does).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any

from dp2o import stopping

log = logging.getLogger("dp2o")

#: seconds between two reads of the flow run's state by the cancel watcher
POLL_SECONDS = 5.0
#: the stop reason a cancel through the API gives
CANCELLED_REASON = "the flow run was cancelled from the Prefect UI or API"


def _is_top_level() -> bool:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx is None or ctx.flow_run is None or ctx.flow_run.parent_task_run_id is None


def _current_flow_run_id():
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow_run.id if ctx is not None and ctx.flow_run is not None else None


def _watch(flow_run_id, done: threading.Event, poll: float) -> None:
    from prefect.client.orchestration import get_client

    while not done.wait(poll):
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(flow_run_id).state
        except Exception as e:  # an API hiccup: try again at the next poll
            log.debug("cancel watcher: cannot read flow run %s: %s", flow_run_id, e)
            continue
        if state is not None and (state.is_cancelling() or state.is_cancelled()):
            if stopping.request(CANCELLED_REASON):
                log.warning("dp2o: %s; stopping at the next batch or step", CANCELLED_REASON)
            return


def watch_cancel(poll: float = POLL_SECONDS) -> Callable[[], None]:
    """Start the watcher of the current flow run; returns the function that stops it."""
    flow_run_id = _current_flow_run_id()
    done = threading.Event()
    if flow_run_id is not None:
        # the thread gets this context: Prefect's settings (the temporary server's API URL) live in it
        ctx = contextvars.copy_context()
        threading.Thread(
            target=ctx.run, args=(_watch, flow_run_id, done, poll), name="dp2o-cancel-watch", daemon=True
        ).start()
    return done.set


def stoppable(fn: Callable[[], Any], on_stopped: Callable[[stopping.Stopped], None] | None = None) -> Any:
    """Run a flow function's body `fn()` under the rules of this module. A `Stopped` error becomes the return
    value `Cancelled(message)` (the flow run ends Cancelled), after `on_stopped(err)` is called."""
    from prefect.exceptions import TerminationSignal
    from prefect.states import Cancelled

    stop_watch = watch_cancel()
    top_level = _is_top_level()
    try:
        return fn()
    except stopping.Stopped as err:
        if on_stopped is not None:
            on_stopped(err)
        return Cancelled(message=stopping.message(err))
    except TerminationSignal as sig:
        stopping.request(_signal_name(sig.signal), sig.signal)
        raise
    except KeyboardInterrupt:
        import signal

        stopping.request("SIGINT", signal.SIGINT)
        raise
    finally:
        stop_watch()
        if top_level:  # a cancel ends with its flow run: a later run in this process starts afresh
            stopping.withdraw(CANCELLED_REASON)


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
