"""Progress of a stage on the `dp2o` logger, shared by every executor (local, Prefect, Ray)."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("dp2o")


class ProgressLog:
    """`<stage>: k/n shards, rows, elapsed, ETA` on the `dp2o` logger: at the first and last shard and at most
    every `every` seconds in between, so long stages are never silent and logs never flood."""

    def __init__(self, stage: str, total: int, every: float = 10.0):
        self.stage, self.total, self.every = stage, total, every
        self.done = self.rows = 0
        self.t0 = self.last = time.monotonic()

    def update(self, marker: Any = None) -> None:
        self.done += 1
        if isinstance(marker, dict):
            self.rows += marker.get("rows", 0)
        now = time.monotonic()
        if self.done not in (1, self.total) and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        log.info(
            "%s: %d/%d shards, %d rows, %.0f s elapsed, ETA %.0f s",
            self.stage,
            self.done,
            self.total,
            self.rows,
            elapsed,
            eta,
        )
