"""Long stages report progress on the `dp2o` logger: the first and last shard, and at most one line every
10 s in between (logs are never silent for minutes, never flooded)."""

from __future__ import annotations

import logging

from dp2o.driver import map_locally
from dp2o.plan import ShardSpec, StagePlan
from dp2o.progress import ProgressLog


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dp2o"]


def test_progress_lines_are_throttled_but_first_and_last_always_shown(caplog):
    caplog.set_level(logging.INFO, logger="dp2o")
    p = ProgressLog("sample", 100)
    for _ in range(100):
        p.update({"rows": 32})
    lines = _lines(caplog)
    assert lines == [lines[0], lines[-1]] and len(lines) == 2
    assert lines[0].startswith("sample: 1/100 shards, 32 rows") and lines[-1].startswith(
        "sample: 100/100 shards, 3200 rows"
    )
    assert "ETA" in lines[0]


def test_progress_every_interval(caplog):
    caplog.set_level(logging.INFO, logger="dp2o")
    p = ProgressLog("degrade", 5, every=0.0)
    for _ in range(5):
        p.update({"rows": 1})
    assert [x.split(",")[0] for x in _lines(caplog)] == [f"degrade: {k}/5 shards" for k in range(1, 6)]


def test_the_local_executor_reports_progress(caplog):
    caplog.set_level(logging.INFO, logger="dp2o")
    plan = StagePlan("degrade", "0" * 16, "memory://x", None, [])
    out = map_locally(lambda plan, spec: {"rows": 2}, [(plan, ShardSpec(i, f"s{i}")) for i in range(3)], 2)
    assert out == [{"rows": 2}] * 3
    assert any(line.startswith("degrade: 3/3 shards, 6 rows") for line in _lines(caplog))


def test_whole_dataset_results_count_their_rows(caplog):
    caplog.set_level(logging.INFO, logger="dp2o")
    p = ProgressLog("pairs", 1)
    p.update([{"rows": 5}, {"rows": 7}])  # run_all returns one marker per output shard
    assert _lines(caplog)[-1].startswith("pairs: 1/1 shards, 12 rows")
