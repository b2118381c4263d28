"""The only code that writes stage outputs: atomic shard commits, completion markers and manifests, over fsspec.

Commit protocol (DESIGN.md): a shard's files are written to a temporary place, moved into their final names
in one step each (`os.replace` locally, one upload per file on object stores — never a writer streamed into
the final remote key, because an exception inside `fs.open(..., "wb")` on S3 still publishes a truncated
object), re-read to check they are whole, and only then is the marker written. A shard is done if and only if
its marker exists and the files it lists have the recorded sizes. Downstream stages read the upstream
manifest, never a listing of the data folder, so stray or half-written files are never picked up.

What a downstream stage reads is verified against the marker (`read_parquet`, `local_copy`, `Storage.download`,
`tario.TarReader`): a file read whole is hashed once per process while it is read or copied; a tar shard is
checked member by member against the per-member sha256 its marker records, so a reader pays only for the
members it reads. A mismatch is a `StageError` naming the file, the shard and `dp2o verify --repair`, never the
decoder's own error, and never data used silently.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import tarfile
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dp2o.errors import StageError

MANIFEST = "_MANIFEST.json"
#: scratch folder inside a local stage folder (one sub-folder per writer)
SCRATCH = ".tmp"
#: prefix of a writer's scratch folder in the system temp dir (stage folders on object stores)
REMOTE_SCRATCH = "dp2o-"
MARKERS = "_markers"
DATA = "data"
#: marker key: per tar file of the shard, {member name: sha256 of the member's bytes}. Beside `files`, not in
#: it, because the manifest copies `files` of every shard and would grow by ~100 bytes per image
MEMBER_SHA256 = "member_sha256"
#: bytes read per step when hashing a stream
CHUNK = 1 << 20


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    with open(path, "rb") as f:
        return _hash_stream(f, chunk)[0]


def _hash_stream(f, chunk: int = CHUNK, copy_to=None) -> tuple[str, int]:
    """(sha256 hex, bytes) of what is left in the binary stream `f`, written on to `copy_to` when given."""
    h, n = hashlib.sha256(), 0
    while block := f.read(chunk):
        h.update(block)
        n += len(block)
        if copy_to is not None:
            copy_to.write(block)
    return h.hexdigest(), n


class Storage:
    """A folder on any fsspec filesystem, addressed by URL (local path, file://, s3://, memory://)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        from dp2o.urls import check_url

        # a malformed scheme (`s3:/x`) would otherwise be a local folder named `s3:`, an unknown one a raw
        # "Protocol not known" from fsspec: refuse both here, whoever builds the Storage
        check_url(url, "storage URL")
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def child(self, *parts: str) -> Storage:
        return Storage(self.join_url(*parts), self.storage_options)

    def join_url(self, *parts: str) -> str:
        return "/".join([self.url, *[p.strip("/") for p in parts if p]])

    def p(self, *parts: str) -> str:
        """Filesystem path (no protocol) of a file under this folder."""
        return "/".join([self.path.rstrip("/"), *[q.strip("/") for q in parts if q]])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.p(*parts))

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.p(*parts)))

    def open(self, *parts: str, mode: str = "rb"):
        return self.fs.open(self.p(*parts), mode)

    def read_json(self, *parts: str) -> Any:
        with self.fs.open(self.p(*parts), "rb") as f:
            return json.loads(f.read().decode("utf-8"))

    def makedirs(self, *parts: str) -> None:
        if self.local:
            os.makedirs(self.p(*parts), exist_ok=True)

    def listdir(self, *parts: str) -> list[str]:
        """Base names under a folder ([] if it does not exist)."""
        try:
            entries = self.fs.ls(self.p(*parts), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def rm(self, *parts: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.p(*parts), recursive=recursive)

    # ---- atomic writes ----------------------------------------------------------------------------------
    def put_atomic(self, local_file: str | Path, *parts: str) -> None:
        """Move/upload a finished local file to its final name in one step."""
        dest = self.p(*parts)
        if self.local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                os.replace(local_file, dest)
            except OSError:
                # another filesystem: copy next to the destination first, then rename there
                tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
                shutil.copyfile(local_file, tmp)
                os.replace(tmp, dest)
        else:
            self.fs.put_file(str(local_file), dest)

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        with self.local_tmpdir() as tmp:
            f = Path(tmp) / "blob"
            f.write_bytes(data)
            self.put_atomic(f, *parts)

    def write_json_atomic(self, obj: Any, *parts: str) -> None:
        self.write_bytes_atomic(
            (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), *parts
        )

    @contextlib.contextmanager
    def local_tmpdir(self) -> Iterator[str]:
        """A scratch folder of this writer (this process) on the same filesystem as this storage when local (so
        moves are renames), else in the system temp dir. Named after the writer (`scratch_prefix`), so a later
        run can tell a dead writer's leftovers from a live one's (`reclaim_scratch`)."""
        if self.local:
            base = self.p(SCRATCH)
            os.makedirs(base, exist_ok=True)
            d = tempfile.mkdtemp(dir=base, prefix=scratch_prefix())
        else:
            d = tempfile.mkdtemp(prefix=f"{REMOTE_SCRATCH}{scratch_prefix()}")
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def download(self, *parts: str, to: str | Path) -> Path:
        """Copy a file of this folder to the local path `to`. A file of a committed shard is hashed while it
        is copied and compared with its marker (a mismatch removes the copy and raises the `StageError` of
        `Committed.corrupted`); the copy is then known verified to `TarReader` in this process."""
        to = Path(to)
        rel = "/".join(q.strip("/") for q in parts if q)
        committed = find_committed(self, rel)
        if committed is None:
            if self.local:
                shutil.copyfile(self.p(rel), to)
            else:
                self.fs.get_file(self.p(rel), str(to))
            return to
        _copy_verified(self, committed, to)
        return to


# ---- verification of written files ---------------------------------------------------------------------


def parquet_rows(path: str | Path) -> int:
    """Row count from the Parquet footer (raises if the file is not a whole Parquet file)."""
    return pq.ParquetFile(path).metadata.num_rows


def tar_members(path: str | Path) -> int:
    """Number of members in a tar file (raises if truncated)."""
    with tarfile.open(path, "r") as tf:
        return sum(1 for _ in tf)


def write_parquet(table: pa.Table, path: str | Path) -> None:
    pq.write_table(table, path, compression="zstd")


# ---- shard commit ------------------------------------------------------------------------------------------


@dataclass
class ShardOutput:
    """Files of one shard, written locally, ready to commit. `files` maps final name (relative to the stage
    folder, e.g. "data/shard-00003.parquet") to a local path."""

    name: str
    files: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    errors: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


def tar_member_sha256(path: str | Path) -> dict[str, str]:
    """{member name: sha256 of its bytes} of the files in a tar (raises if truncated)."""
    with tarfile.open(path, "r") as tf:
        return {m.name: hashlib.sha256(tf.extractfile(m).read()).hexdigest() for m in tf if m.isfile()}


def _check_file(local: str) -> dict[str, Any]:
    info: dict[str, Any] = {"bytes": os.path.getsize(local), "sha256": sha256_file(local)}
    if local.endswith(".parquet"):
        info["rows"] = parquet_rows(local)
    elif local.endswith(".tar"):
        info["members"] = tar_members(local)
    return info


def commit_shard(stage_dir: Storage, out: ShardOutput, *, fingerprint: str, seconds: float) -> dict[str, Any]:
    """Commit a shard: verify each local file, move/upload it into place, re-check the landed size, then write
    the marker last. The marker records each file's size and sha256, and each tar member's sha256 (what a
    reader of single members checks). Returns the marker."""
    files: dict[str, dict[str, Any]] = {}
    members: dict[str, dict[str, str]] = {}
    for rel, local in sorted(out.files.items()):
        info = _check_file(local)
        if local.endswith(".tar"):
            members[rel] = tar_member_sha256(local)
        stage_dir.put_atomic(local, rel)
        landed = stage_dir.size(rel)
        if landed != info["bytes"]:
            raise OSError(f"{stage_dir.join_url(rel)}: landed {landed} bytes, expected {info['bytes']}")
        files[rel] = info
    marker = {
        "shard": out.name,
        "fingerprint": fingerprint,
        "files": files,
        "rows": out.rows,
        "errors": out.errors,
        "stats": out.stats,
        "seconds": round(seconds, 3),
        "created": now_iso(),
    }
    if members:
        marker[MEMBER_SHA256] = members
    stage_dir.write_json_atomic(marker, MARKERS, f"{out.name}.json")
    return marker


# ---- reading committed shards, verified ----------------------------------------------------------------------


def repair_command(stage_url: str) -> str:
    """The command that withdraws a stage folder's corrupted shards, so that the next run recomputes them."""
    return f"dp2o verify --repair {shlex.quote(stage_url)}"


@dataclass(frozen=True)
class Committed:
    """A file of a committed shard, as its marker recorded it."""

    stage_url: str
    rel: str
    shard: str
    bytes: int
    sha256: str
    #: {member: sha256} of a tar committed with per-member digests; None for other files and older markers
    member_sha256: Mapping[str, str] | None = None

    @property
    def url(self) -> str:
        return f"{self.stage_url}/{self.rel}"

    def digest_problem(self, sha256: str, n: int) -> str | None:
        """What differs between bytes read (their sha256 and count) and the marker's record; None if nothing."""
        if n != self.bytes:
            return f"{n} bytes, the marker recorded {self.bytes}"
        if sha256 != self.sha256:
            return f"sha256 {sha256[:16]}... differs from the marker's {self.sha256[:16]}..."
        return None

    def corrupted(self, what: str) -> StageError:
        """The error a reader raises instead of using the file."""
        return StageError(
            f"{self.url} (shard {self.shard} of {self.stage_url}) is corrupted ({what}) and was not used; run "
            f"`{repair_command(self.stage_url)}` to withdraw the shard, then rerun: only that shard is recomputed"
        )


@dataclass
class ShardCheck:
    """What checking one shard's marker and files found."""

    name: str
    marker: dict | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.marker is not None and not self.problems


def _well_formed(marker: Any) -> bool:
    files = marker.get("files") if isinstance(marker, dict) else None
    return isinstance(files, dict) and all(
        isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
        for i in files.values()
    )


def _load_marker(stage_dir: Storage, name: str) -> tuple[dict | None, str]:
    """(marker, "") or (None, why there is none): a marker is itself a file that can be damaged."""
    try:
        marker = stage_dir.read_json(MARKERS, f"{name}.json")
    except FileNotFoundError:
        return None, "no marker"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "unreadable marker"
    return (marker, "") if _well_formed(marker) else (None, "unreadable marker")


def _committed(stage_dir: Storage, shard: str, rel: str, marker: dict) -> Committed:
    info = marker["files"][rel]
    members = marker.get(MEMBER_SHA256, {}).get(rel)
    return Committed(stage_dir.url, rel, shard, info["bytes"], info["sha256"], members)


def check_shard(stage_dir: Storage, name: str, *, fingerprint: str, verify_hash: bool = False) -> ShardCheck:
    """Check shard `name`: its marker against `fingerprint`, its files against the marker (sizes; with
    verify_hash, the sha256 of every byte, streamed, and for a damaged tar which members differ). The one check
    behind `read_marker` (is the shard done?) and `dp2o verify` (dp2o.verify)."""
    marker, why = _load_marker(stage_dir, name)
    if marker is None:
        return ShardCheck(name, None, [why])
    if marker.get("fingerprint") != fingerprint:
        theirs = marker.get("fingerprint")
        return ShardCheck(
            name, marker, [f"marker of another config (fingerprint {theirs}, not {fingerprint})"]
        )
    problems = []
    for rel in marker["files"]:
        c = _committed(stage_dir, name, rel, marker)
        try:
            size = stage_dir.size(rel)
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        if size != c.bytes:
            problems.append(f"{rel}: {size} bytes, the marker recorded {c.bytes}")
        elif verify_hash and (problem := _hash_problem(stage_dir, c)):
            problems.append(f"{rel}: {problem}")
    return ShardCheck(name, marker, problems)


def read_marker(stage_dir: Storage, name: str, *, fingerprint: str, verify_hash: bool = False) -> dict | None:
    """The marker of shard `name` if the shard is complete and matches `fingerprint` (with verify_hash: and
    every byte of its files matches the recorded sha256), else None."""
    check = check_shard(stage_dir, name, fingerprint=fingerprint, verify_hash=verify_hash)
    return check.marker if check.ok else None


def find_committed(stage_dir: Storage, rel: str) -> Committed | None:
    """What the marker of the shard holding `rel` recorded about it; None when `rel` is no shard file of a stage
    folder (neither a marker nor the manifest lists it). The marker is found by the file's stem
    (`data/shard-00003.parquet` -> `shard-00003`), else through the manifest (a train stage's `model/` files).
    A file the manifest lists whose marker is gone or damaged raises a StageError: that shard is not committed."""
    guess = PurePosixPath(rel).stem
    marker, why = _load_marker(stage_dir, guess)
    if marker is not None and rel in marker["files"]:
        return _committed(stage_dir, guess, rel, marker)
    shard = _listed_in_manifest(stage_dir, rel)
    if shard is None:
        return None
    if shard != guess:
        marker, why = _load_marker(stage_dir, shard)
    if marker is None or rel not in marker["files"]:
        raise StageError(
            f"{stage_dir.join_url(rel)}: shard {shard} of {stage_dir.url} is in its {MANIFEST} but not committed "
            f"({why or 'its marker does not list the file'}); run `{repair_command(stage_dir.url)}`, then rerun"
        )
    return _committed(stage_dir, shard, rel, marker)


def _listed_in_manifest(stage_dir: Storage, rel: str) -> str | None:
    try:
        manifest = stage_dir.read_json(MANIFEST)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return next((s["name"] for s in manifest.get("shards", []) if rel in s.get("files", {})), None)


def committed_file(stage_dir: Storage, rel: str) -> Committed:
    """Like `find_committed`, but a file no marker lists is an error: downstream stages read committed shards only."""
    found = find_committed(stage_dir, rel)
    if found is None:
        raise StageError(
            f"{stage_dir.join_url(rel)} is not a file of a committed shard (no marker of {stage_dir.url} lists it, "
            "e.g. withdrawn by `dp2o verify --repair`); rerun the stage that writes it"
        )
    return found


#: files whose bytes matched their marker in this process, so each is hashed once however often it is read:
#: ("local", sha256, file identity) for a local file (a stage folder's own or a copy: rewriting it changes its
#: identity), ("remote", stage URL, file, sha256) for an object-store file
_VERIFIED: set[tuple] = set()
#: local copies made and verified in this process (identity -> what they are a copy of), for `origin_of`
_COPIES: dict[tuple, Committed] = {}


def _identity(path: str | Path) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _local_key(path: str | Path, c: Committed) -> tuple:
    try:
        return ("local", c.sha256, _identity(path))
    except FileNotFoundError:
        raise c.corrupted("the file is missing") from None


def _key(stage_dir: Storage, c: Committed) -> tuple:
    return _local_key(stage_dir.p(c.rel), c) if stage_dir.local else ("remote", c.stage_url, c.rel, c.sha256)


def _hash_problem(stage_dir: Storage, c: Committed) -> str | None:
    """Hash a committed file where it lies; None (and remembered) if it matches its marker, else what differs."""
    with stage_dir.open(c.rel) as f:
        problem = c.digest_problem(*_hash_stream(f))
    if problem is None:
        _VERIFIED.add(_key(stage_dir, c))
        return None
    if c.member_sha256:
        bad = _bad_members(stage_dir, c)
        problem += f"; member(s) {', '.join(bad[:5])}{' and more' if len(bad) > 5 else ''} differ"
    return problem


def _bad_members(stage_dir: Storage, c: Committed) -> list[str]:
    """Members of a damaged tar whose bytes differ from the marker's record (or are missing/unexpected)."""
    expected = c.member_sha256 or {}
    try:
        with stage_dir.open(c.rel) as f, tarfile.open(fileobj=f, mode="r") as tf:
            found = {m.name: hashlib.sha256(tf.extractfile(m).read()).hexdigest() for m in tf if m.isfile()}
    except (tarfile.TarError, OSError) as e:
        return [f"(all: tar headers unreadable: {e})"]
    return sorted(n for n in set(found) | set(expected) if found.get(n) != expected.get(n))


def verify_committed(stage_dir: Storage, rel: str) -> Committed:
    """Check a whole file of a committed shard against its marker's sha256 (once per process); returns the
    record. Raises the `StageError` of `Committed.corrupted` on a mismatch."""
    c = committed_file(stage_dir, rel)
    if _key(stage_dir, c) not in _VERIFIED and (problem := _hash_problem(stage_dir, c)):
        raise c.corrupted(problem)
    return c


def read_parquet(stage_dir: Storage, rel: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file of a committed shard. The first read in a process checks it against its marker's sha256
    (the bytes are read once: hashed, then parsed from memory); later reads parse it directly."""
    c = committed_file(stage_dir, rel)
    key = _key(stage_dir, c)
    if key in _VERIFIED:
        with stage_dir.open(rel) as f:
            return pq.read_table(f, columns=columns)
    with stage_dir.open(rel) as f:
        data = f.read()
    if problem := c.digest_problem(hashlib.sha256(data).hexdigest(), len(data)):
        raise c.corrupted(problem)
    _VERIFIED.add(key)
    return pq.read_table(pa.BufferReader(data), columns=columns)


def local_copy(stage_dir: Storage, rel: str, tmp: Path) -> Path:
    """A local path to read `rel` of a stage folder, checked against its marker: the file itself when local
    (hashed once per process; a tar with per-member digests is instead checked member by member by `TarReader`
    as it reads), else a download into `tmp`, hashed while it is copied (named after the stage folder too: a
    stage may read two stages' files with the same shard name)."""
    c = committed_file(stage_dir, rel)
    if stage_dir.local:
        if c.member_sha256 is None:
            verify_committed(stage_dir, rel)
        return Path(stage_dir.p(rel))
    dest = tmp / f"{hashlib.sha1(stage_dir.url.encode()).hexdigest()[:12]}-{rel.replace('/', '__')}"
    _copy_verified(stage_dir, c, dest)
    return dest


def _copy_verified(stage_dir: Storage, c: Committed, to: Path) -> None:
    """Copy a committed file to the local path `to`, hashing it on the way; a mismatch removes the copy."""
    with stage_dir.open(c.rel) as src, open(to, "wb") as dst:
        problem = c.digest_problem(*_hash_stream(src, copy_to=dst))
    if problem:
        to.unlink(missing_ok=True)
        raise c.corrupted(problem)
    _VERIFIED.update((_local_key(to, c), _key(stage_dir, c)))
    _COPIES[_identity(to)] = c


def origin_of(path: str | Path) -> Committed | None:
    """The committed shard file a local path holds: a verified copy made in this process (`local_copy`,
    `Storage.download`), or a file `data/<name>` of a local stage folder (found by that layout, so a reader
    given a bare path is checked too); None for any other file."""
    try:
        copy = _COPIES.get(_identity(path))
    except FileNotFoundError:
        return None
    if copy is not None:
        return copy
    p = Path(path).resolve()
    if p.parent.name != DATA or not (p.parent.parent / "config.json").is_file():
        return None
    return committed_file(Storage(str(p.parent.parent)), f"{DATA}/{p.name}")


def whole_verified(path: str | Path, c: Committed) -> bool:
    """Whether the local file `path` was checked whole against `c` in this process."""
    return _local_key(path, c) in _VERIFIED


def verify_local(path: str | Path, c: Committed) -> None:
    """Check a local file whole against `c` (once per process); raises `c.corrupted` on a mismatch."""
    key = _local_key(path, c)
    if key in _VERIFIED:
        return
    with open(path, "rb") as f:
        problem = c.digest_problem(*_hash_stream(f))
    if problem:
        raise c.corrupted(problem)
    _VERIFIED.add(key)


# ---- scratch space of dead writers -------------------------------------------------------------------------

_WRITER = re.compile(r"^w(\d+)@(.*)~[^~]*$")


def scratch_prefix() -> str:
    """`w<pid>@<host>~`: whose scratch folder this is (mkdtemp appends a random suffix)."""
    return f"w{os.getpid()}@{socket.gethostname()}~"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _dead_writer(name: str) -> bool:
    """True for a scratch folder of a process of this host that no longer runs; False for a live writer's,
    another host's (it cannot be checked from here) or a name that is not a writer's."""
    m = _WRITER.match(name)
    return bool(m) and m.group(2) == socket.gethostname() and not _alive(int(m.group(1)))


def reclaim_scratch(stage_dir: Storage | None = None) -> list[str]:
    """Remove the scratch folders that dead dp2o processes of this host left behind: inside a local stage
    folder's `.tmp/`, and `dp2o-*` folders of the system temp dir (remote stage folders). A live writer's
    scratch (another worker on the same stage) is never touched. Returns the removed paths."""
    # (folder, prefix of a writer's scratch there): the system temp dir holds other programs' folders too
    places = [(Path(tempfile.gettempdir()), REMOTE_SCRATCH)]
    if stage_dir is not None and stage_dir.local:
        places.append((Path(stage_dir.p(SCRATCH)), ""))
    removed = []
    for place, prefix in places:
        try:
            entries = [e for e in place.iterdir() if e.name.startswith(prefix) and e.is_dir()]
        except OSError:
            continue
        for entry in entries:
            if _dead_writer(entry.name[len(prefix) :]):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
    if stage_dir is not None and stage_dir.local:
        with contextlib.suppress(OSError):
            os.rmdir(stage_dir.p(SCRATCH))  # only if empty: other writers may still use it
    return removed
