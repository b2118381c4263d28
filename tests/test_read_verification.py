"""What a downstream stage reads is verified: a shard damaged after its commit (bytes flipped in a Parquet
footer or data page, in a PNG stream of a tar, whether or not the damage still decodes) fails the reading stage
with a StageError naming the file, the shard and `dp2o verify --repair`; the repair withdraws that shard's
marker and the manifest; the rerun recomputes that one shard, byte-identical, and the pipeline goes on."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dp2o import storage
from dp2o.driver import run_pipeline
from dp2o.errors import StageError
from dp2o.storage import (
    MANIFEST,
    MARKERS,
    MEMBER_SHA256,
    ShardOutput,
    Storage,
    check_shard,
    commit_shard,
    local_copy,
    read_marker,
    read_parquet,
)
from dp2o.tario import TarReader, decode_png, encode_png, write_tar
from dp2o.verify import verify_stage
from tests.helpers import make_hr_folder, tiny_pipeline_config

# ---- damage ------------------------------------------------------------------------------------------------------


def _flip(path: Path, offset: int, n: int = 1) -> None:
    """XOR n bytes in place (same size, same file: what bit rot or a stray writer does)."""
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _footer_span(raw: bytes) -> tuple[int, int]:
    """(offset, length) of a Parquet file's thrift footer."""
    length = struct.unpack("<I", raw[-8:-4])[0]
    return len(raw) - 8 - length, length


def _flip_that_still_decodes(path: Path) -> None:
    """Flip the first byte of the data pages whose damaged file still reads, to different values."""
    raw = path.read_bytes()
    before = pq.read_table(io.BytesIO(raw))
    for i in range(4, _footer_span(raw)[0]):
        data = bytearray(raw)
        data[i] ^= 0x01
        try:
            after = pq.read_table(io.BytesIO(bytes(data)))
        except Exception:  # noqa: BLE001, S112 - pyarrow raises several types; this offset breaks decoding
            continue
        if not after.equals(before):
            path.write_bytes(bytes(data))
            return
    raise AssertionError("no data-page byte whose flip still decodes")


def _member(tar_path: Path, suffix: str) -> tuple[str, int, int]:
    """(name, data offset, size) of the first member whose name ends with `suffix`."""
    with tarfile.open(tar_path) as tf:
        m = next(m for m in tf if m.name.endswith(suffix))
        return m.name, m.offset_data, m.size


def _idat(png: bytes) -> tuple[int, int]:
    """(offset, length) of the first IDAT chunk's data in a PNG."""
    pos = 8
    while True:
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        if kind == b"IDAT":
            return pos + 8, length
        pos += 12 + length


def _png_flip_that_still_decodes(png: bytes) -> int:
    """Offset in `png` of a byte of the IDAT zlib stream whose flip still inflates, to different pixels."""
    before = decode_png(png)
    start, length = _idat(png)
    for i in range(
        start + length - 1, start, -1
    ):  # near the end of the stream a flip changes the last pixels
        data = bytearray(png)
        data[i] ^= 0x01
        try:
            after = decode_png(bytes(data))
        except Exception:  # noqa: BLE001, S112 - PIL raises several types; this offset breaks the stream
            continue
        if not np.array_equal(after, before):
            return i
    raise AssertionError("no IDAT byte whose flip still decodes")


# ---- a tiny pipeline ---------------------------------------------------------------------------------------------


def _pipeline(tmp_path: Path):
    hr = make_hr_folder(tmp_path / "hr", n=4)
    return tiny_pipeline_config(str(tmp_path / "run"), str(hr))


def _assert_names_file_and_repair(err: pytest.ExceptionInfo, stage_url: str, rel: str, shard: str) -> None:
    msg = str(err.value)
    assert f"{stage_url}/{rel}" in msg, msg
    assert f"shard {shard}" in msg, msg
    assert f"dp2o verify --repair {stage_url}" in msg, msg


def _repair_then_rerun(cfg, stage: str, stage_url: str, shard: str, until: str, original: bytes, rel: str):
    """verify finds exactly `shard`; repair withdraws its marker and the manifest; the rerun recomputes that
    shard alone, byte-identical to what was committed before the damage, and the reading stage finishes."""
    found = verify_stage(stage_url)
    assert not found.ok and [c.name for c in found.bad] == [shard]
    assert rel in str(found) and "dp2o verify --repair" in str(found)
    repaired = verify_stage(stage_url, repair=True)
    assert sorted(repaired.withdrawn) == sorted([MANIFEST, f"{MARKERS}/{shard}.json"])
    out = Path(stage_url)
    assert not (out / MANIFEST).exists() and not (out / MARKERS / f"{shard}.json").exists()
    assert (out / MARKERS).is_dir() and len(list((out / MARKERS).glob("*.json"))) == 1  # the good one stays

    results = run_pipeline(cfg, until=until)
    assert (results[stage].computed, results[stage].skipped) == (1, 1)
    assert (out / rel).read_bytes() == original
    assert results[until].manifest["rows"] > 0
    assert verify_stage(stage_url).ok


def test_parquet_footer_flip_fails_the_reading_stage_and_repair_recomputes_one_shard(tmp_path):
    cfg = _pipeline(tmp_path)
    score_url = run_pipeline(cfg, until="score")["score"].url
    rel = "data/shard-00001.parquet"
    f = Path(score_url) / rel
    original = f.read_bytes()
    start, _ = _footer_span(original)
    # the footer's first bytes are the thrift header of FileMetaData (its middle is now mostly the column docs'
    # key-value metadata, where a flip may leave the file readable or fail as ArrowInvalid)
    _flip(f, start, 3)
    with pytest.raises((OSError, pa.ArrowInvalid)):  # pyarrow's own error: "Couldn't deserialize thrift"
        pq.read_table(f)
    assert (
        read_marker(
            Storage(score_url),
            "shard-00001",
            fingerprint=json.loads((Path(score_url) / MANIFEST).read_text())["fingerprint"],
        )
        is not None
    )  # same size: skipped as done

    with pytest.raises(StageError) as err:
        run_pipeline(cfg, until="reward")
    _assert_names_file_and_repair(err, score_url, rel, "shard-00001")
    _repair_then_rerun(cfg, "score", score_url, "shard-00001", "reward", original, rel)


def test_parquet_data_page_flip_that_still_decodes_is_not_used(tmp_path):
    cfg = _pipeline(tmp_path)
    score_url = run_pipeline(cfg, until="score")["score"].url
    rel = "data/shard-00000.parquet"
    f = Path(score_url) / rel
    original = f.read_bytes()
    _flip_that_still_decodes(f)
    assert not pq.read_table(f).equals(pq.read_table(io.BytesIO(original)))  # would be used silently

    with pytest.raises(StageError, match="sha256") as err:
        run_pipeline(cfg, until="reward")
    _assert_names_file_and_repair(err, score_url, rel, "shard-00000")
    _repair_then_rerun(cfg, "score", score_url, "shard-00000", "reward", original, rel)


def test_png_stream_flip_in_a_sample_tar_fails_the_score_stage(tmp_path):
    cfg = _pipeline(tmp_path)
    sample_url = run_pipeline(cfg, until="sample")["sample"].url
    rel = "data/shard-00000.tar"
    f = Path(sample_url) / rel
    original = f.read_bytes()
    name, offset, size = _member(f, ".sr.png")
    start, length = _idat(original[offset : offset + size])
    _flip(f, offset + start + length // 2, 8)
    with pytest.raises(OSError):  # noqa: PT011 - PIL's own error: "broken data stream"
        decode_png(f.read_bytes()[offset : offset + size])

    with pytest.raises(StageError, match=name) as err:
        run_pipeline(cfg, until="score")
    _assert_names_file_and_repair(err, sample_url, rel, "shard-00000")
    assert name in str(verify_stage(sample_url))  # the report names the damaged member
    _repair_then_rerun(cfg, "sample", sample_url, "shard-00000", "score", original, rel)


def test_png_pixel_flip_that_still_decodes_in_a_degrade_tar_is_not_used(tmp_path):
    cfg = _pipeline(tmp_path)
    degrade_url = run_pipeline(cfg, until="degrade")["degrade"].url
    rel = "data/shard-00001.tar"
    f = Path(degrade_url) / rel
    original = f.read_bytes()
    name, offset, size = _member(f, ".lr.png")  # what the sample stage reads
    png = original[offset : offset + size]
    _flip(f, offset + _png_flip_that_still_decodes(png))
    damaged = f.read_bytes()[offset : offset + size]
    assert not np.array_equal(decode_png(damaged), decode_png(png))  # decodes: would be sampled silently

    with pytest.raises(StageError, match=name) as err:
        run_pipeline(cfg, until="sample")
    _assert_names_file_and_repair(err, degrade_url, rel, "shard-00001")
    _repair_then_rerun(cfg, "degrade", degrade_url, "shard-00001", "sample", original, rel)


# ---- the pieces, without a pipeline --------------------------------------------------------------------------------


def _image_stage(folder: Path, shards: int = 2) -> tuple[Storage, dict[str, bytes]]:
    """A finished stage folder of `shards` image shards (Parquet index + tar of 2 PNGs each), committed the
    way the driver commits; returns it and each member's bytes."""
    st = Storage(str(folder))
    st.write_json_atomic({"stage": "test", "fingerprint": "fp"}, "config.json")
    rng = np.random.default_rng(0)
    members, entries = {}, []
    for i in range(shards):
        name = storage.shard_name(i)
        tmp = folder.parent / f"local-{name}"
        tmp.mkdir()
        pngs = [
            (f"s{i}{k}.lr.png", encode_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))) for k in "ab"
        ]
        members.update(pngs)
        write_tar(tmp / "x.tar", pngs)
        storage.write_parquet(pa.table({"sample_id": [f"s{i}a", f"s{i}b"]}), tmp / "x.parquet")
        out = ShardOutput(
            name,
            {f"data/{name}.tar": str(tmp / "x.tar"), f"data/{name}.parquet": str(tmp / "x.parquet")},
            rows=2,
        )
        marker = commit_shard(st, out, fingerprint="fp", seconds=0.0)
        entries.append({"name": name, "files": marker["files"], "rows": 2, "errors": 0})
    st.write_json_atomic({"stage": "test", "fingerprint": "fp", "shards": entries}, MANIFEST)
    return st, members


def test_commit_records_each_member_digest_beside_the_files_and_leaves_data_bytes_alone(tmp_path):
    pngs = [("a.lr.png", b"\x89PNG one"), ("b.lr.png", b"\x89PNG two")]
    write_tar(tmp_path / "x.tar", pngs)
    local_bytes = (tmp_path / "x.tar").read_bytes()
    st = Storage(str(tmp_path / "stage"))
    marker = commit_shard(
        st,
        ShardOutput("shard-00000", {"data/shard-00000.tar": str(tmp_path / "x.tar")}),
        fingerprint="fp",
        seconds=0,
    )
    assert marker[MEMBER_SHA256] == {
        "data/shard-00000.tar": {n: hashlib.sha256(b).hexdigest() for n, b in pngs}
    }
    assert MEMBER_SHA256 not in marker["files"]["data/shard-00000.tar"]  # the manifest copies `files`
    assert (tmp_path / "stage" / "data" / "shard-00000.tar").read_bytes() == local_bytes


def test_tar_reader_checks_each_member_it_reads_and_only_those(tmp_path):
    st, members = _image_stage(tmp_path / "stage")
    f = tmp_path / "stage" / "data" / "shard-00000.tar"
    name, offset, _ = _member(f, "s0b.lr.png")
    _flip(f, offset + 40)
    with TarReader(local_copy(st, "data/shard-00000.tar", tmp_path)) as tar:
        assert tar.read("s0a.lr.png") == members["s0a.lr.png"]  # an intact member of a damaged shard reads
        with pytest.raises(StageError, match="s0b.lr.png") as err:
            tar.image(name)
    _assert_names_file_and_repair(err, st.url, "data/shard-00000.tar", "shard-00000")


def test_a_bare_path_into_a_stage_folder_is_checked_too(tmp_path):
    """A reader that builds the path itself (the train stage's pair images) gets the same check."""
    _image_stage(tmp_path / "stage")
    f = tmp_path / "stage" / "data" / "shard-00001.tar"
    _, offset, _ = _member(f, "s1a.lr.png")
    _flip(f, offset + 50, 8)
    with TarReader(f) as tar, pytest.raises(StageError, match="dp2o verify --repair"):
        tar.image("s1a.lr.png")


def test_damaged_tar_headers_are_a_stage_error_not_a_tarfile_error(tmp_path):
    st, _ = _image_stage(tmp_path / "stage")
    f = tmp_path / "stage" / "data" / "shard-00000.tar"
    _, offset, size = _member(f, "s0b.lr.png")
    _flip(f, offset - 512 + 3)  # the second member's name, inside its header
    with pytest.raises(StageError, match="shard-00000") as err:
        TarReader(local_copy(st, "data/shard-00000.tar", tmp_path))
    assert "dp2o verify --repair" in str(err.value)


def test_markers_without_member_digests_fall_back_to_one_whole_file_hash(tmp_path, monkeypatch):
    st, _ = _image_stage(tmp_path / "stage")
    marker_path = tmp_path / "stage" / MARKERS / "shard-00000.json"
    marker = json.loads(marker_path.read_text())
    del marker[MEMBER_SHA256]  # as written before per-member digests
    marker_path.write_text(json.dumps(marker))
    hashed = []
    real = storage._hash_stream
    monkeypatch.setattr(storage, "_hash_stream", lambda f, *a, **k: hashed.append(1) or real(f, *a, **k))
    for _ in range(3):
        with TarReader(local_copy(st, "data/shard-00000.tar", tmp_path)) as tar:
            tar.image("s0a.lr.png")
    assert len(hashed) == 1  # hashed once per process, however often it is read

    _flip(tmp_path / "stage" / "data" / "shard-00000.tar", 700)
    with pytest.raises(StageError, match="sha256"):
        local_copy(st, "data/shard-00000.tar", tmp_path)


def test_parquet_is_hashed_once_per_process(tmp_path, monkeypatch):
    st, _ = _image_stage(tmp_path / "stage")
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(storage.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        assert read_parquet(st, "data/shard-00001.parquet")["sample_id"].to_pylist() == ["s1a", "s1b"]
    assert len(calls) == 1


def test_object_store_copies_are_hashed_while_downloaded(tmp_path):
    local, members = _image_stage(tmp_path / "stage")
    remote = Storage("memory://dp2o-read-verification/stage")
    remote.fs.put(local.path, remote.path, recursive=True)
    (tmp_path / "dl").mkdir()
    with TarReader(local_copy(remote, "data/shard-00000.tar", tmp_path / "dl")) as tar:
        assert tar.read("s0a.lr.png") == members["s0a.lr.png"]
    assert read_parquet(remote, "data/shard-00000.parquet").num_rows == 2

    for rel in ("data/shard-00001.tar", "data/shard-00001.parquet"):
        data = bytearray(remote.open(rel).read())
        data[len(data) // 2] ^= 0xFF
        remote.fs.pipe_file(remote.p(rel), bytes(data))
    with pytest.raises(StageError, match="memory://dp2o-read-verification/stage/data/shard-00001.tar"):
        local_copy(remote, "data/shard-00001.tar", tmp_path / "dl")
    assert not [p for p in (tmp_path / "dl").iterdir() if "shard-00001" in p.name]  # no damaged copy left
    with pytest.raises(StageError, match="shard-00001.parquet"):
        read_parquet(remote, "data/shard-00001.parquet")
    remote.fs.rm(remote.path, recursive=True)


def test_a_withdrawn_shard_is_never_read(tmp_path):
    st, _ = _image_stage(tmp_path / "stage")
    (tmp_path / "stage" / MARKERS / "shard-00001.json").unlink()
    with pytest.raises(StageError, match="not committed"):  # the manifest still lists it
        read_parquet(st, "data/shard-00001.parquet")
    (tmp_path / "stage" / MANIFEST).unlink()
    with pytest.raises(StageError, match="not a file of a committed shard"):
        local_copy(st, "data/shard-00001.tar", tmp_path)
    assert read_parquet(st, "data/shard-00000.parquet").num_rows == 2


def test_verify_and_read_marker_share_one_check_and_repair_touches_only_markers(tmp_path):
    st, _ = _image_stage(tmp_path / "stage")
    clean = verify_stage(st.url)
    assert clean.ok and "2 of 2 shards verified" in str(clean)
    f = tmp_path / "stage" / "data" / "shard-00001.tar"
    name, offset, _ = _member(f, "s1b.lr.png")
    _flip(f, offset + 30, 3)
    damaged = f.read_bytes()

    check = check_shard(st, "shard-00001", fingerprint="fp", verify_hash=True)
    assert not check.ok and "data/shard-00001.tar" in check.problems[0] and name in check.problems[0]
    assert read_marker(st, "shard-00001", fingerprint="fp") is not None  # sizes only: looks done
    assert read_marker(st, "shard-00001", fingerprint="fp", verify_hash=True) is None

    report = verify_stage(str(tmp_path / "stage"), repair=False)
    assert not report.ok and report.withdrawn == [] and "dp2o verify --repair" in "\n".join(report.lines())
    assert (tmp_path / "stage" / MANIFEST).exists()
    report = verify_stage(str(tmp_path), repair=True)  # the folder above: its one stage folder
    assert report.withdrawn == [MANIFEST, f"{MARKERS}/shard-00001.json"]
    assert f.read_bytes() == damaged  # never rewritten in place: the rerun commits a new file over it
    assert (tmp_path / "stage" / MARKERS / "shard-00000.json").exists()
    after = verify_stage(st.url)
    assert not after.ok and [c.name for c in after.checks] == ["shard-00000"] and after.manifest == "missing"
