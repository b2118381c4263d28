"""Prefect artifacts of stage runs (flows/artifacts.py) and the stages' plain-data descriptions (describe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import make_hr_folder, tiny_pipeline_config

PIPELINE = ("degrade", "sample", "score", "reward", "pairs", "train")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny pipeline run to the end, locally (no Prefect)."""
    from dp2o.driver import run_pipeline

    tmp = tmp_path_factory.mktemp("describe")
    hr = make_hr_folder(tmp / "hr", n=2)
    cfg = tiny_pipeline_config(str(tmp / "run"), str(hr))
    return run_pipeline(cfg)


def _describe(results, name):
    from dp2o import registry

    r = results[name]
    items = registry.get(name).describe(r.manifest, r.url, r.manifest and _storage(r.url))
    json.dumps(items)  # plain data
    return {i["key"]: i for i in items}


def _storage(url):
    from dp2o.storage import Storage

    return Storage(url)


@pytest.mark.slow
def test_describe_reward_score_pairs_train(finished_run):
    reward = _describe(finished_run, "reward")
    hist = reward["reward-histogram"]["rows"]
    assert hist and sum(r["count"] for r in hist) == finished_run["reward"].manifest["rows"]
    metrics = reward["reward-metrics"]["rows"]
    assert metrics and all(r["direction"] in ("higher better", "lower better") for r in metrics)
    assert all(r["raw_min"] <= r["raw_max"] for r in metrics)
    assert all(r["corr_with_reward"] is None or -1 <= r["corr_with_reward"] <= 1 for r in metrics)

    score = _describe(finished_run, "score")
    assert {r["metric"] for r in score["metrics"]["rows"]} == {r["metric"] for r in metrics}

    pairs = _describe(finished_run, "pairs")
    counts = {r["count"]: r["value"] for r in pairs["pairs-counts"]["rows"]}
    assert counts["pairs"] == finished_run["pairs"].manifest["rows"]
    assert {"groups", "groups_with_pairs", "groups_zero_spread", "groups_too_small"} <= set(counts)
    assert sum(r["count"] for r in pairs["pairs-weights"]["rows"]) == counts["pairs"]

    train = _describe(finished_run, "train")
    text = train["train-curve"]["markdown"]
    assert "loss" in text and "implicit acc" in text and "| step |" in text
    assert any(c in text for c in "▁▂▃▄▅▆▇█")
    assert train["model"]["link"].endswith("/model")
    assert (Path(train["model"]["link"]) / "").exists()


def test_describe_helpers():
    from dp2o import describe as d

    h = d.histogram([0, 1, 2, 3, 4, 4, None, float("nan")], bins=4)
    assert [r["count"] for r in h] == [1, 1, 1, 3]
    assert d.histogram([]) == [] and d.histogram([2, 2])[0]["count"] == 2


def test_histogram_and_summary_take_columns_without_a_python_loop():
    """A stage's column goes to the histogram as it is (pyarrow, with nulls; numpy, with NaN and inf), with the
    same bins as a plain list; a million rows are counted whole."""
    import numpy as np
    import pyarrow as pa

    from dp2o import describe as d

    values = [0, 1, 2, 3, 4, 4, None, float("nan"), float("inf")]
    as_list = d.histogram(values, bins=4)
    column = pa.chunked_array([pa.array(values[:4], pa.float64()), pa.array(values[4:], pa.float64())])
    assert d.histogram(column, bins=4) == as_list
    assert d.histogram(np.array(values, dtype=float), bins=4) == as_list
    assert d.summary(column) == {"count": 6, "min": 0.0, "mean": 2.3333, "max": 4.0}
    big = pa.array(np.random.default_rng(0).random(1_000_000))
    assert sum(r["count"] for r in d.histogram(big, bins=20)) == 1_000_000
    assert d.sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert len(d.sparkline(range(1000), width=40)) == 40
    assert d.correlation([1, 2, 3], [2, 4, 6]) == 1.0 and d.correlation([1, 1], [1, 2]) is None
    assert d.sample_indices(100, 5) == [0, 25, 50, 74, 99] or d.sample_indices(100, 5)[-1] == 99
    assert "| a |" in d.markdown_table([{"a": 1}])


def test_shards_table_stays_small(tmp_path):
    from dp2o.plan import ShardSpec, StagePlan
    from flows.artifacts import artifact_key, shard_rows

    n = 1200
    plan = StagePlan("score", "f" * 16, str(tmp_path), None, [ShardSpec(i, f"{i:05d}") for i in range(n)])
    manifest = {
        "shards": [{"name": f"{i:05d}", "rows": 3, "errors": 0} for i in range(n)],
        "rows": 3 * n,
        "errors": 0,
    }
    fresh = [{"shard": f"{i:05d}", "seconds": 1.0, "stats": {"device": "cuda:0"}} for i in range(n)]
    rows = shard_rows(plan, manifest, fresh)
    assert len(rows) == 101 and rows[-1]["rows"] == 3 * n and rows[-1]["seconds"] == n
    assert rows[0]["device"] == "cuda:0"
    key = artifact_key("score", "s3://Bucket/Run_1/score/abc", "shards")
    assert key == artifact_key("score", "s3://Bucket/Run_1/score/abc", "shards")
    assert all(c.islower() or c.isdigit() or c == "-" for c in key)


def _latest(client, prefix: str) -> dict:
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    got = client.read_latest_artifacts(
        artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(like_=prefix))
    )
    return {a.key: a for a in got}


def _progress_values(client, key: str) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return [a.data for a in arts]


@pytest.mark.slow
def test_pipeline_publishes_artifacts(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client

    from flows import pipeline
    from flows.artifacts import artifact_key

    hr = make_hr_folder(tmp_path / "hr", n=2)
    cfg = tiny_pipeline_config(str(tmp_path / "run"), str(hr))
    assert pipeline(config=cfg, return_state=True).is_completed()
    urls = {}
    for name in PIPELINE:
        [fp] = [p for p in (tmp_path / "run" / name).iterdir() if (p / "_MANIFEST.json").exists()]
        urls[name] = str(fp)

    with get_client(sync_client=True) as client:
        first = {name: _latest(client, f"dp2o-{name}-%") for name in PIPELINE}
        for name in PIPELINE:
            key = lambda s, n=name: artifact_key(n, urls[n], s)  # noqa: E731
            arts = first[name]
            assert arts[key("shards")].type == "table", arts.keys()
            # Prefect stores a link artifact as markdown `[text](link)`
            assert Path(urls[name]).as_uri() in arts[key("output")].data
            assert Path(urls[name], "_MANIFEST.json").as_uri() in arts[key("manifest")].data
            assert arts[key("progress")].type == "progress"
            assert float(_progress_values(client, key("progress"))[-1]) == 100.0
            rows = json.loads(arts[key("shards")].data)
            assert (
                sum(r["rows"] for r in rows)
                == json.loads(Path(urls[name], "_MANIFEST.json").read_text())["rows"]
            )
        reward = first["reward"][artifact_key("reward", urls["reward"], "reward-histogram")]
        assert reward.type == "table" and sum(r["count"] for r in json.loads(reward.data)) > 0
        assert artifact_key("reward", urls["reward"], "reward-metrics") in first["reward"]
        pairs = json.loads(first["pairs"][artifact_key("pairs", urls["pairs"], "pairs-counts")].data)
        assert any(r["count"] == "groups_with_pairs" for r in pairs)
        assert artifact_key("pairs", urls["pairs"], "pairs-weights") in first["pairs"]
        curve = first["train"][artifact_key("train", urls["train"], "train-curve")]
        assert curve.type == "markdown" and "implicit acc" in curve.data
        assert "/model" in first["train"][artifact_key("train", urls["train"], "model")].data

        # a rerun publishes new versions of the same keys: no new keys
        assert pipeline(config=cfg, return_state=True).is_completed()
        for name in PIPELINE:
            again = _latest(client, f"dp2o-{name}-%")
            assert set(again) == set(first[name])
            for k, a in again.items():
                assert a.latest_id != first[name][k].latest_id
            key = artifact_key(name, urls[name], "progress")
            assert float(_progress_values(client, key)[-1]) == 100.0
