"""The image behind any row of a stage table: a degrade row's LR/HR crop, a candidate's SR image.

A row of degrade (`sample_id`), sample/score/reward (`sample_id`, `candidate`) or pairs (`sample_id`, `win`,
`lose`) names an image member of a tar shard of an image stage (degrade or sample). That stage is found
through manifests only: the row's own stage when it is an image stage, else the one its manifest records
under `upstream`. The shard holding a `sample_id` is read from the image stage's Parquet index (the row's
`shard` key when it has one), never from a listing. Members are read through `dp2o.tario.TarReader` with the
per-member sha256 of the shard's marker, so a damaged member is a `StageError`, never wrong pixels.

    from dp2o.images import open_image, image_ref
    img = open_image(row, "runs/demo/reward")           # uint8 [H, W, 3]: the candidate's SR image
    lr = open_image(row, "runs/demo/reward", "lr")      # the LR input it was sampled from
    url, member = image_ref(row, "runs/demo/reward")    # for other tools (webdataset, tar, ...)
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dp2o.errors import StageError
from dp2o.plan import read_manifest, resolve_stage_dir
from dp2o.storage import Storage, committed_file, local_copy, read_parquet

#: which image a row's `which` names -> (image stage, member suffix)
_KINDS = {"lr": ("degrade", "lr"), "hr": ("degrade", "hr"), "sr": ("sample", "sr")}
#: pairs rows: `which` picks the candidate column
_PAIR_SIDES = ("win", "lose")


class ImageRef(NamedTuple):
    """Where an image lies: the tar shard's URL and the member's name in it."""

    tar_url: str
    member: str


def _get(row: Any, key: str, default: Any = None) -> Any:
    """A field of a dict, pandas Series/namedtuple row or any object with attributes."""
    if isinstance(row, Mapping):
        return row.get(key, default)
    try:
        return row[key]
    except (KeyError, TypeError, IndexError):
        return getattr(row, key, default)


def _stage_dir(stage_dir: Storage | str, storage_options: dict | None) -> Storage:
    if isinstance(stage_dir, Storage):
        return resolve_stage_dir(stage_dir.url, stage_dir.storage_options)
    return resolve_stage_dir(stage_dir, storage_options)


def _image_stage(stage_dir: Storage, manifest: dict, stage: str) -> Storage:
    if manifest["stage"] == stage:
        return stage_dir
    up = manifest.get("upstream", {}).get(stage)
    if up is None:
        raise StageError(
            f"{stage_dir.url}: its {manifest['stage']} manifest records no upstream {stage} folder"
        )
    return Storage(up["url"], stage_dir.storage_options)


#: (image stage URL, fingerprint) -> {sample_id: shard name}
_SHARD_OF: dict[tuple[str, str], dict[str, str]] = {}


def _shard_of(image_dir: Storage, sample_id: str) -> str:
    m = read_manifest(image_dir)
    key = (image_dir.url, m["fingerprint"])
    if key not in _SHARD_OF:
        index: dict[str, str] = {}
        for s in m["shards"]:
            rel = f"data/{s['name']}.parquet"
            if rel in s["files"]:
                for sid in read_parquet(image_dir, rel, columns=["sample_id"])["sample_id"].to_pylist():
                    index.setdefault(sid, s["name"])
        _SHARD_OF[key] = index
    try:
        return _SHARD_OF[key][sample_id]
    except KeyError:
        raise KeyError(f"sample_id {sample_id!r} is not in {image_dir.url}") from None


def _locate(
    row: Any, stage_dir: Storage | str, which: str | None, storage_options: dict | None
) -> tuple[Storage, str, str]:
    """(image stage folder, tar path relative to it, member name)."""
    sd = _stage_dir(stage_dir, storage_options)
    manifest = read_manifest(sd)
    sample_id = _get(row, "sample_id")
    if sample_id is None:
        raise ValueError("the row has no sample_id")
    candidate = _get(row, "candidate")
    if which in _PAIR_SIDES:
        candidate, which = _get(row, which), "sr"
    elif which is None:
        if candidate is not None:
            which = "sr"
        elif manifest["stage"] == "degrade":
            which = "lr"
        else:
            raise ValueError(
                f"a {manifest['stage']} row without a candidate: pass which= one of {[*_KINDS, *_PAIR_SIDES]}"
            )
    if which not in _KINDS:
        raise ValueError(f"which={which!r}: use one of {[*_KINDS, *_PAIR_SIDES]}")
    stage, suffix = _KINDS[which]
    image_dir = _image_stage(sd, manifest, stage)
    if stage == "sample":
        if candidate is None:
            raise ValueError("the row has no candidate (pairs rows: pass which='win' or 'lose')")
        from dp2o.sample.stage import candidate_key

        stem = candidate_key(str(sample_id), int(candidate))
    else:
        stem = str(sample_id)
    shard = _get(row, "shard") or _shard_of(image_dir, str(sample_id))
    return image_dir, f"data/{shard}.tar", f"{stem}.{suffix}.png"


def image_ref(
    row: Any, stage_dir: Storage | str, which: str | None = None, *, storage_options: dict | None = None
) -> ImageRef:
    """(tar URL, member name) of the image of `row`, a row of the stage folder `stage_dir` (a finished stage
    folder, or `<root>/<stage>` holding one). `which`: "lr"/"hr" (the degrade crops), "sr" (the candidate;
    default for rows with a `candidate`), "win"/"lose" (a pairs row's candidates)."""
    image_dir, rel, member = _locate(row, stage_dir, which, storage_options)
    return ImageRef(image_dir.join_url(rel), member)


#: open readers of local (or downloaded, verified) tar shards, least recently used first
_READERS: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
_MAX_READERS = 8
_DOWNLOADS: Path | None = None


def _downloads() -> Path:
    global _DOWNLOADS
    if _DOWNLOADS is None:
        _DOWNLOADS = Path(tempfile.mkdtemp(prefix="dp2o-images-"))
        atexit.register(shutil.rmtree, _DOWNLOADS, True)
    return _DOWNLOADS


def _reader(image_dir: Storage, rel: str):
    from dp2o.tario import TarReader

    c = committed_file(image_dir, rel)  # a shard withdrawn or never committed is an error here
    key = (image_dir.url, rel, c.sha256)
    if key in _READERS:
        _READERS.move_to_end(key)
        return _READERS[key]
    # local: the shard itself (members checked as read); remote: one verified download per shard
    path = local_copy(image_dir, rel, _downloads())
    reader = TarReader(path, c.member_sha256, origin=c)
    _READERS[key] = reader
    while len(_READERS) > _MAX_READERS:
        _READERS.popitem(last=False)[1].close()
    return reader


def read_image_bytes(
    row: Any, stage_dir: Storage | str, which: str | None = None, *, storage_options: dict | None = None
) -> bytes:
    """The PNG bytes of the image of `row` (see `image_ref`), checked against the shard's marker."""
    image_dir, rel, member = _locate(row, stage_dir, which, storage_options)
    reader = _reader(image_dir, rel)
    if member not in reader:
        raise KeyError(
            f"{member} is not in {image_dir.join_url(rel)} (a failed row has no image: see its status)"
        )
    return reader.read(member)


def open_image(
    row: Any,
    stage_dir: Storage | str,
    which: str | None = None,
    *,
    storage_options: dict | None = None,
    pil: bool = False,
):
    """The image of `row` (a dict, a pandas row, ...) of the stage folder `stage_dir`, decoded: uint8
    [H, W, 3] RGB (a PIL image with pil=True). `which` as in `image_ref`."""
    from dp2o.tario import decode_png

    arr = decode_png(read_image_bytes(row, stage_dir, which, storage_options=storage_options))
    if pil:
        from PIL import Image

        return Image.fromarray(arr)
    return np.asarray(arr)
