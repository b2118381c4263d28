"""Commit protocol: a shard is done iff its marker exists and matches; nothing half-written looks done."""

from __future__ import annotations

import json

import pyarrow as pa

from dp2o import storage as dio
from dp2o.storage import ShardOutput, Storage, commit_shard, read_marker


def _shard(tmp_path, name="shard-00000", rows=3):
    p = tmp_path / "local.parquet"
    dio.write_parquet(pa.table({"x": list(range(rows))}), p)
    return ShardOutput(name, {f"data/{name}.parquet": str(p)}, rows=rows)


def test_commit_then_marker_valid(tmp_path):
    st = Storage(str(tmp_path / "stage"))
    marker = commit_shard(st, _shard(tmp_path), fingerprint="fp", seconds=0.1)
    assert marker["files"]["data/shard-00000.parquet"]["rows"] == 3
    assert read_marker(st, "shard-00000", fingerprint="fp") is not None
    assert read_marker(st, "shard-00000", fingerprint="other") is None


def test_data_without_marker_is_not_done(tmp_path):
    st = Storage(str(tmp_path / "stage"))
    (tmp_path / "stage" / "data").mkdir(parents=True)
    (tmp_path / "stage" / "data" / "shard-00000.parquet").write_bytes(b"PAR1 truncated")
    assert read_marker(st, "shard-00000", fingerprint="fp") is None


def test_truncated_file_after_marker_is_not_done(tmp_path):
    st = Storage(str(tmp_path / "stage"))
    commit_shard(st, _shard(tmp_path), fingerprint="fp", seconds=0.0)
    f = tmp_path / "stage" / "data" / "shard-00000.parquet"
    f.write_bytes(f.read_bytes()[:-10])
    assert read_marker(st, "shard-00000", fingerprint="fp") is None


def test_corrupt_marker_is_not_done(tmp_path):
    st = Storage(str(tmp_path / "stage"))
    commit_shard(st, _shard(tmp_path), fingerprint="fp", seconds=0.0)
    (tmp_path / "stage" / "_markers" / "shard-00000.json").write_text('{"shard": ')
    assert read_marker(st, "shard-00000", fingerprint="fp") is None


def test_same_size_corruption_caught_by_hash(tmp_path):
    st = Storage(str(tmp_path / "stage"))
    commit_shard(st, _shard(tmp_path), fingerprint="fp", seconds=0.0)
    f = tmp_path / "stage" / "data" / "shard-00000.parquet"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    assert read_marker(st, "shard-00000", fingerprint="fp") is not None  # size check only
    assert read_marker(st, "shard-00000", fingerprint="fp", verify_hash=True) is None


def test_truncated_parquet_is_refused_before_commit(tmp_path):
    st = Storage(str(tmp_path / "stage"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    import pytest

    with pytest.raises(Exception):  # noqa: B017 - pyarrow raises its own ArrowInvalid
        commit_shard(
            st,
            ShardOutput("shard-00000", {"data/shard-00000.parquet": str(bad)}),
            fingerprint="fp",
            seconds=0,
        )
    assert not st.exists("_markers", "shard-00000.json")


def test_write_json_atomic_memory_fs():
    st = Storage("memory://dp2o-test-io/stage")
    st.write_json_atomic({"a": 1}, "x", "y.json")
    assert json.loads(st.open("x", "y.json").read()) == {"a": 1}
