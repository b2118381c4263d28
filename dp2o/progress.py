"""Progress of a stage, shared by every executor (local, Prefect, Ray), at two levels:

- `ProgressLog`: shards of a stage (`<stage>: k/n shards, rows, elapsed, ETA`);
- `within(label, total, unit)`: the work inside one shard or whole-dataset body (candidates of a sample shard,
  crops of a degrade shard, steps of training), so a shard that takes minutes is not silent for minutes.

Both always log to the `dp2o` logger: the first and last update and at most one line every `every` seconds in
between (10 s), which is what non-interactive logs and the Prefect UI (`PREFECT_LOGGING_EXTRA_LOGGERS=dp2o`)
show. When stderr is a terminal they also draw tqdm bars with counts, rate and ETA. `DP2O_PROGRESS` chooses:
`auto` (bars on a terminal; the default), `bars` (always), `lines` (no bars), `off` (neither bars nor lines).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

log = logging.getLogger("dp2o")
T = TypeVar("T")

#: seconds between two progress lines of one tracker (the first and the last are always written)
EVERY_SECONDS = 10.0


def _mode() -> str:
    mode = os.environ.get("DP2O_PROGRESS", "auto").strip().lower()
    return mode if mode in ("auto", "bars", "lines", "off") else "auto"


def bars_enabled() -> bool:
    """Draw tqdm bars: DP2O_PROGRESS=bars, or auto with stderr a terminal."""
    mode = _mode()
    if mode == "bars":
        return True
    if mode != "auto":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _bar(total: int, desc: str, unit: str, *, leave: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr)


class _Tracker:
    """Counts done of total; a throttled log line and, with bars, a tqdm bar."""

    def __init__(self, label: str, total: int, unit: str, every: float, *, leave: bool, lines: bool = True):
        self.label, self.total, self.unit, self.every = label, max(0, int(total)), unit, every
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self.logged_last = False
        self.lines = lines and _mode() != "off"
        self.bar = _bar(self.total, label, unit, leave=leave) if bars_enabled() else None

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if not self.lines:
            return
        now = time.monotonic()
        first, last = self.done == n, self.done >= self.total
        if last and self.logged_last:
            return
        if not (first or last) and now - self.last < self.every:
            return
        self.last = now
        self.logged_last = last
        elapsed = now - self.t0
        eta = elapsed / self.done * max(0, self.total - self.done) if self.done else float("nan")
        log.info("%s, %.0f s elapsed, ETA %.0f s", self.line(), elapsed, eta)

    def line(self) -> str:
        return f"{self.label}: {self.done}/{self.total} {self.unit}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ProgressLog(_Tracker):
    """`<stage>: k/n shards, rows, elapsed, ETA`: a line at the first and last shard and at most every `every`
    seconds in between; a bar of shards on a terminal."""

    def __init__(self, stage: str, total: int, every: float = EVERY_SECONDS):
        self.stage = stage
        self.rows = 0
        super().__init__(stage, total, "shards", every, leave=True)

    def update(self, marker: Any = None) -> None:
        for m in marker if isinstance(marker, list) else [marker]:  # a whole-dataset body returns a list
            if isinstance(m, dict):
                self.rows += m.get("rows", 0) or 0
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.rows} rows", refresh=False)
        self.advance(1)
        if self.done >= self.total:
            self.close()

    def line(self) -> str:
        return f"{self.stage}: {self.done}/{self.total} shards, {self.rows} rows"


class Within(_Tracker):
    """Progress inside one shard: `with within("sample shard-00003", 256, "candidates") as p: ... p.update(8)`,
    or around a loop: `for i in within(...).over(range(0, n, b), lambda i: min(b, n - i)): ...`."""

    def __init__(self, label: str, total: int, unit: str, every: float = EVERY_SECONDS, lines: bool = True):
        super().__init__(label, total, unit, every, leave=False, lines=lines)

    def update(self, n: int = 1) -> None:
        self.advance(n)

    def over(self, items: Iterable[T], weight: Callable[[T], int] = lambda _: 1) -> Iterator[T]:
        """Yield `items`; each one counts `weight(item)` once the loop body has run for it. Closes the bar at the
        end, also when the loop is left by an exception (a stop request, an error)."""
        try:
            for item in items:
                yield item
                self.update(weight(item))
        finally:
            self.close()

    def __enter__(self) -> Within:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def within(label: str, total: int, unit: str, every: float = EVERY_SECONDS, lines: bool = True) -> Within:
    """A progress tracker for the work inside one shard (see the module doc); `lines=False`: a bar only (for a
    loop that logs its own lines, e.g. training)."""
    return Within(label, total, unit, every, lines)
