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


def test_within_counts_each_item_after_its_body_and_logs_first_and_last(caplog, monkeypatch):
    from dp2o.progress import within

    monkeypatch.setenv("DP2O_PROGRESS", "lines")
    caplog.set_level(logging.INFO, logger="dp2o")
    seen = []
    p = within("sample shard-00000", 10, "candidates")
    for _ in p.over(range(0, 10, 4), lambda i: min(4, 10 - i)):
        seen.append(p.done)  # the item's own weight counts only once its body ran
    assert seen == [0, 4, 8] and p.done == 10
    lines = _lines(caplog)
    assert lines[0].startswith("sample shard-00000: 4/10 candidates")
    assert lines[-1].startswith("sample shard-00000: 10/10 candidates") and len(lines) == 2


def test_within_closes_its_bar_when_the_loop_raises(monkeypatch, capsys):
    from dp2o.progress import within

    monkeypatch.setenv("DP2O_PROGRESS", "bars")
    p = within("score shard-00001", 6, "candidates")
    try:
        for _ in p.over(range(6)):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert p.bar is None  # closed
    assert "score shard-00001" in capsys.readouterr().err


def test_bars_show_counts_and_eta_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("DP2O_PROGRESS", "bars")
    p = ProgressLog("degrade", 3, every=1e9)
    for _ in range(3):
        p.update({"rows": 2})
    err = capsys.readouterr().err
    assert "degrade" in err and "3/3" in err and "6 rows" in err


def test_off_writes_nothing(monkeypatch, caplog, capsys):
    monkeypatch.setenv("DP2O_PROGRESS", "off")
    caplog.set_level(logging.INFO, logger="dp2o")
    p = ProgressLog("pairs", 2)
    p.update({"rows": 1})
    p.update({"rows": 1})
    assert not _lines(caplog) and not capsys.readouterr().err


def test_a_sample_shard_reports_its_candidates(tmp_path, caplog, monkeypatch):
    """The progress inside a shard reaches the log: the first and the last batch of a sample shard."""
    from dp2o.driver import run_pipeline
    from tests.helpers import make_hr_folder, tiny_pipeline_config

    monkeypatch.setenv("DP2O_PROGRESS", "lines")
    caplog.set_level(logging.INFO, logger="dp2o")
    cfg = tiny_pipeline_config(str(tmp_path / "runs"), str(make_hr_folder(tmp_path / "hr", n=2)))
    run_pipeline(cfg, until="sample")
    within_lines = [x for x in _lines(caplog) if x.startswith("sample shard-")]
    assert any(" 16/16 candidates" in x for x in within_lines), within_lines  # 2 photos x 2 crops x 4
