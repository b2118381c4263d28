"""Stopping a run on request (SIGTERM, Ctrl-C, a cancel from the Prefect UI) within seconds, keeping what is done.

One process-wide stop flag. Whoever owns the process sets it: the CLI's signal handlers (`on_signals`), and
under Prefect the flows (a cancel seen through the API, or Prefect's own termination signal reaching the flow).
The long loops of the stage bodies call `check()` at their batch and step boundaries (the backends once per
denoising step, training once per step), and the executors before starting a shard; `check()` raises `Stopped`
once a stop is requested. A shard commits only after its body returns, so a stopped shard never commits: its
scratch folder is removed (or, if the process dies first, reclaimed by the next run), the shards committed
before the stop stay, and rerunning the same command resumes from them.

The design choice a reader would miss: the stop is cooperative because signals cannot stop the work. Python
runs signal handlers in the main thread only, while shard bodies run in worker threads (the local executor's
thread pool, Prefect's thread-pool task runner), and both the pool's shutdown and the interpreter's exit join
those threads: measured before this module, a SIGTERM under Prefect waited for the running shard to finish and
commit (13.5 s of an 18 s tiny-model shard; minutes with a real model), and a Ctrl-C did the same (21.6 s).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dp2o.errors import Dp2oError

#: exit status of a command stopped by a signal (the shell's convention, 128 + the signal number)
SIGNAL_EXIT_BASE = 128


class Stopped(Dp2oError):
    """The run was asked to stop. Committed shards stay; rerunning the same command resumes from them."""

    def __init__(self, reason: str = "a stop was requested", signum: int | None = None):
        super().__init__(reason, signum)  # both in args: the exception pickles (Prefect, Ray) with them
        self.reason = reason
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped ({self.reason})"

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM, 1 for a cancel that came through the API."""
        return SIGNAL_EXIT_BASE + self.signum if self.signum else 1


_event = threading.Event()
_lock = threading.Lock()
_why: tuple[str, int | None] | None = None
#: stage folders this process worked on: out_url -> (stage, () -> (shards committed, shards planned))
_stages: dict[str, tuple[str, Callable[[], tuple[int, int]]]] = {}


def request(reason: str, signum: int | None = None) -> bool:
    """Ask the running work to stop; True for the first request (later ones keep the first reason)."""
    global _why
    with _lock:
        first = _why is None
        if first:
            _why = (reason, signum)
        _event.set()
    return first


def requested() -> bool:
    return _event.is_set()


def check() -> None:
    """Raise `Stopped` if a stop was requested; call it between batches, steps and shards."""
    if _event.is_set():
        reason, signum = _why or ("a stop was requested", None)
        raise Stopped(reason, signum)


def wait(seconds: float) -> None:
    """Sleep up to `seconds`, then `check()`: a polling loop that a stop request ends at once."""
    _event.wait(seconds)
    check()


def stopped() -> Stopped | None:
    """The `Stopped` error of the current request, or None when none was made."""
    if not _event.is_set():
        return None
    reason, signum = _why or ("a stop was requested", None)
    return Stopped(reason, signum)


def withdraw(reason: str) -> None:
    """Forget the current request if `reason` made it (the stage counts stay, for the run's message)."""
    global _why
    with _lock:
        if _why is not None and _why[0] == reason:
            _why = None
            _event.clear()


def clear() -> None:
    """Forget a request and the tracked stages (a new run in this process)."""
    global _why
    with _lock:
        _why = None
        _event.clear()
        _stages.clear()


def track(stage: str, url: str, committed: Callable[[], tuple[int, int]]) -> None:
    """Remember a stage folder this run works on, with a function counting its committed and planned shards,
    so the message of a stopped run can say what was kept (`committed_lines`)."""
    with _lock:
        _stages[url] = (stage, committed)


def committed_lines() -> list[str]:
    """`<stage>: k/n shards committed (<url>)` for every stage folder of this run, in the order started."""
    with _lock:
        stages = list(_stages.items())
    lines = []
    for url, (stage, count) in stages:
        try:
            done, total = count()
            lines.append(f"{stage}: {done}/{total} shards committed ({url})")
        except Exception as e:  # a message about a stop must not fail
            lines.append(f"{stage}: committed shards not counted ({type(e).__name__}) ({url})")
    return lines


def message(err: Stopped) -> str:
    """The one-line report of a stopped run: why, what is committed, and that rerunning resumes."""
    kept = "; ".join(committed_lines()) or "nothing committed yet"
    return (
        f"{err}: {kept}; nothing half-written is marked committed; rerun the same command to resume "
        "(committed shards are skipped)"
    )


@contextmanager
def on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """While active, SIGTERM and SIGINT request a stop instead of killing the process; a second Ctrl-C raises
    KeyboardInterrupt at once. Outside the main thread (where handlers cannot be installed) it does nothing.
    A repeated SIGTERM is not an escalation: Prefect re-sends the one it received once its flow run has
    crashed; SIGKILL is the way to stop a process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        if signum == signal.SIGINT and requested():
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if request(name, signum):
            sys.stderr.write(
                f"dp2o: {name} received: stopping at the next batch or step; committed shards are kept"
                + (" (Ctrl-C again to stop at once)\n" if signum == signal.SIGINT else "\n")
            )
            sys.stderr.flush()

    clear()
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
