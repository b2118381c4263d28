"""The only code that writes stage outputs: atomic shard commits, completion markers and manifests, over fsspec.

Commit protocol (DESIGN.md): a shard's files are written to a temporary place, moved into their final names
in one step each (`os.replace` locally, one upload per file on object stores — never a writer streamed into
the final remote key, because an exception inside `fs.open(..., "wb")` on S3 still publishes a truncated
object), re-read to check they are whole, and only then is the marker written. A shard is done if and only if
its marker exists and the files it lists have the recorded sizes. Downstream stages read the upstream
manifest, never a listing of the data folder, so stray or half-written files are never picked up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "_MANIFEST.json"
#: scratch folder inside a local stage folder (one sub-folder per writer)
SCRATCH = ".tmp"
#: prefix of a writer's scratch folder in the system temp dir (stage folders on object stores)
REMOTE_SCRATCH = "dp2o-"
MARKERS = "_markers"
DATA = "data"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Storage:
    """A folder on any fsspec filesystem, addressed by URL (local path, file://, s3://, memory://)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
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
        to = Path(to)
        if self.local:
            shutil.copyfile(self.p(*parts), to)
        else:
            self.fs.get_file(self.p(*parts), str(to))
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


def _check_file(local: str) -> dict[str, Any]:
    info: dict[str, Any] = {"bytes": os.path.getsize(local), "sha256": sha256_file(local)}
    if local.endswith(".parquet"):
        info["rows"] = parquet_rows(local)
    elif local.endswith(".tar"):
        info["members"] = tar_members(local)
    return info


def commit_shard(stage_dir: Storage, out: ShardOutput, *, fingerprint: str, seconds: float) -> dict[str, Any]:
    """Commit a shard: verify each local file, move/upload it into place, re-check the landed size, then write
    the marker last. Returns the marker."""
    files: dict[str, dict[str, Any]] = {}
    for rel, local in sorted(out.files.items()):
        info = _check_file(local)
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
    stage_dir.write_json_atomic(marker, MARKERS, f"{out.name}.json")
    return marker


def read_marker(stage_dir: Storage, name: str, *, fingerprint: str, verify_hash: bool = False) -> dict | None:
    """The marker of shard `name` if the shard is complete and matches `fingerprint`, else None."""
    try:
        marker = stage_dir.read_json(MARKERS, f"{name}.json")
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if marker.get("fingerprint") != fingerprint:
        return None
    for rel, info in marker.get("files", {}).items():
        try:
            if stage_dir.size(rel) != info["bytes"]:
                return None
        except FileNotFoundError:
            return None
        if verify_hash:
            with stage_dir.local_tmpdir() as tmp:
                local = stage_dir.download(rel, to=Path(tmp) / "f")
                if sha256_file(local) != info["sha256"]:
                    return None
    return marker


def read_parquet(stage_dir: Storage, rel: str, columns: list[str] | None = None) -> pa.Table:
    with stage_dir.open(rel) as f:
        return pq.read_table(f, columns=columns)


def local_copy(stage_dir: Storage, rel: str, tmp: Path) -> Path:
    """A local path to read `rel` of a stage folder: the file itself when local, else a download into `tmp`
    (named after the stage folder too: a stage may read two stages' files with the same shard name)."""
    if stage_dir.local:
        return Path(stage_dir.p(rel))
    dest = tmp / f"{hashlib.sha1(stage_dir.url.encode()).hexdigest()[:12]}-{rel.replace('/', '__')}"
    return stage_dir.download(rel, to=dest)


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
