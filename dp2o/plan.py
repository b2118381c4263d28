"""What a stage run is before it runs: a plan of shards, where it writes, and which finished folders it reads.

A `StagePlan` is plain data (config, URLs, shard specs) so any executor can ship it to a worker; it never
holds tables or images. Planning is cheap: it reads upstream manifests, never their data.

The design choice a reader would miss: an upstream folder is found through its `_MANIFEST.json` only. A URL is
either a finished stage folder or `<root>/<stage>` holding exactly one finished fingerprint folder; several
finished runs there are an error that names them, and data is never found by globbing a folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from hashlib import sha1
from typing import Any

import pyarrow as pa

from dp2o.errors import StageError
from dp2o.storage import MANIFEST, Storage, read_marker, verify_committed


@dataclass(frozen=True)
class ShardSpec:
    index: int
    name: str
    #: stage-specific inputs: source refs for degrade, nothing for 1:1 stages (the name is the key)
    inputs: tuple = ()


@dataclass
class StagePlan:
    """Everything needed to run a stage, serialisable so an orchestrator can ship it to workers."""

    stage: str
    fingerprint: str
    out_url: str
    config: Any
    shards: list[ShardSpec]
    upstream: dict[str, dict[str, Any]] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: stage-specific settings that do not enter the fingerprint (e.g. train's runtime backend fields)
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Storage:
        return Storage(self.out_url, self.storage_options)

    def only(self, spec: ShardSpec) -> StagePlan:
        """This plan reduced to one shard: what a shard task needs (a degrade plan's other shards carry every
        source file's reference, which would make every task's parameters as large as the whole input list)."""
        return dataclasses.replace(self, shards=[spec])

    def slim(self) -> StagePlan:
        """This plan with the shards' inputs dropped (names and indices kept): what finalising and whole-dataset
        bodies need."""
        return dataclasses.replace(self, shards=[ShardSpec(s.index, s.name) for s in self.shards])

    def upstream_dir(self, stage: str) -> Storage:
        try:
            return Storage(self.upstream[stage]["url"], self.storage_options)
        except KeyError:
            raise StageError(f"{self.stage}: no upstream {stage!r} recorded in the plan") from None


def pending_shards(plan: StagePlan) -> list[ShardSpec]:
    """Shards without a valid marker (the only ones an executor runs)."""
    out = plan.out
    return [s for s in plan.shards if read_marker(out, s.name, fingerprint=plan.fingerprint) is None]


# ---- locating stage folders ------------------------------------------------------------------------------------


def stage_url(root: str, stage: str, fp: str) -> str:
    return f"{root.rstrip('/')}/{stage}/{fp}"


def out_url(out: str | None, root: str | None, stage: str, fp: str) -> str:
    """An explicit output folder, or `<root>/<stage>/<fingerprint>` (root defaults to `runs`)."""
    return out or stage_url(root or "runs", stage, fp)


def find_stage_dir(
    url: str, storage_options: dict | None = None, children: Iterable[str] | None = None
) -> Storage | None:
    """The finished stage folder at `url` (the folder itself, or its only finished child); None if there is
    none; an error naming them if there are several. `children`: the child folder names when the caller has
    listed them already (only those are checked; a folder of a thousand images costs no GET per file)."""
    s = Storage(url, storage_options)
    if s.exists(MANIFEST):
        return s
    names = s.listdir() if children is None else children
    done = [name for name in names if s.exists(name, MANIFEST)]
    if len(done) > 1:
        raise StageError(f"{url} holds several finished runs {done}; pass one of them explicitly")
    return s.child(done[0]) if done else None


def resolve_stage_dir(url: str, storage_options: dict | None = None, stage: str | None = None) -> Storage:
    """Like `find_stage_dir`, but a missing finished folder is an error that says what to run."""
    found = find_stage_dir(url, storage_options)
    if found is None:
        what = f"{stage} " if stage else ""
        raise StageError(
            f"{url} is not a finished {what}stage folder (no {MANIFEST}); run the {what}stage first, "
            "or pass the folder that holds _MANIFEST.json"
        )
    return found


def read_manifest(stage_dir: Storage) -> dict:
    return stage_dir.read_json(MANIFEST)


@dataclass(frozen=True)
class Upstream:
    """A finished upstream stage folder, its manifest read once (one GET on object stores)."""

    dir: Storage
    manifest: dict

    @classmethod
    def at(cls, url: str, storage_options: dict, stage: str) -> Upstream:
        found = resolve_stage_dir(url, storage_options, stage)
        return cls(found, read_manifest(found))

    @property
    def entry(self) -> dict:
        """What a downstream manifest records about this folder under `upstream`."""
        m = self.manifest
        return {"url": self.dir.url, "fingerprint": m["fingerprint"], "stage": m["stage"]}

    @property
    def lineage(self) -> dict:
        """This folder's own `upstream` record: the stages before it."""
        return self.manifest["upstream"]

    def shards(self) -> list[ShardSpec]:
        """Shards named like this folder's (a stage that maps shard to shard)."""
        return [ShardSpec(i, s["name"]) for i, s in enumerate(self.manifest["shards"])]


def listing_hash(keys) -> str:
    """Fingerprint of an input that is a list of files rather than a stage folder: a hash of one key per file."""
    return sha1("\n".join(keys).encode()).hexdigest()


def parquet_files(url: str, storage_options: dict) -> list[tuple[str, int]]:
    """(path, size) of the Parquet files of a user's folder that is not a stage folder (hidden and `_` paths
    skipped), or of one file."""
    s = Storage(url, storage_options)
    if s.fs.isfile(s.path):
        return [(s.path, s.fs.size(s.path))]
    found = sorted(p for p in s.fs.find(s.path) if p.endswith(".parquet") and "/." not in p and "/_" not in p)
    if not found:
        raise StageError(f"{url}: no Parquet files (and no _MANIFEST.json) found")
    return [(p, s.fs.size(p)) for p in found]


def read_stage_table(stage_dir: Storage, columns: list[str] | None = None) -> pa.Table:
    """One table over the Parquet files a finished stage's manifest lists, read as one pyarrow dataset."""
    import pyarrow.dataset as ds

    m = read_manifest(stage_dir)
    rels = [rel for s in m["shards"] for rel in s["files"] if rel.endswith(".parquet")]
    for rel in rels:
        verify_committed(stage_dir, rel)  # against its marker's sha256; hashed once per process
    paths = [stage_dir.p(rel) for rel in rels]
    if not paths:
        return pa.table({})
    return ds.dataset(paths, format="parquet", filesystem=stage_dir.fs).to_table(columns=columns)
