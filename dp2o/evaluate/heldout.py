"""The held-out set of the evaluate stage: a finished degrade stage folder, or a plain folder of the user's images.

A plain folder is read in one of two layouts:

* `lr/` (and optionally `hr/`) subfolders: every image under `lr/` is an input; its HR is the image under `hr/`
  with the same relative path stem (`lr/0801.png` <-> `hr/0801.jpg`), or, failing that, the same stem without
  a trailing scale tag (`lr/0801x4.png` <-> `hr/0801.png`, the DIV2K/benchmark naming). An LR without a
  matching HR is scored with no-reference metrics only.
* anything else: every image in the folder (recursively) is an LR input without HR.

The design choice a reader would miss: the folder is listed once, at planning time, and the listing (relative
paths with byte sizes) is both the held-out fingerprint and the shard's input list. Running never lists the
folder again, so a file added after planning cannot slip into a run whose fingerprint does not cover it,
and planning never decodes an image.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

import numpy as np

from dp2o.errors import StageError
from dp2o.plan import find_stage_dir, listing_hash, read_manifest
from dp2o.storage import Storage

#: what a held-out folder's images may be (other files, e.g. a README, are ignored)
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"})
_SCALE_TAG = re.compile(r"[_-]?x\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class HeldoutInput:
    """One held-out LR input in memory. lr, hr: uint8 [H, W, 3] RGB; hr None when the input has no HR.
    lr_name / hr_name say where the image came from, for error messages."""

    sample_id: str
    source: str
    lr: np.ndarray
    hr: np.ndarray | None
    lr_name: str
    hr_name: str | None = None


# ---- planning: what the held-out set is --------------------------------------------------------------------


def _ext(path: str) -> str:
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[1].lower() if "." in base.lstrip(".") else ""


def _stem(rel: str) -> str:
    return rel.rsplit(".", 1)[0] if _ext(rel) else rel


def _images(s: Storage, sub: str = "") -> dict[str, tuple[str, int]]:
    """relative path (from `s/sub`) -> (URL, bytes) of every non-hidden image file under it, recursively."""
    root = s.p(sub).rstrip("/")
    found = s.fs.find(root, detail=True)
    out = {}
    for path, info in sorted(found.items()):
        rel = posixpath.relpath(path, root)
        if any(part.startswith(".") for part in rel.split("/")) or _ext(rel) not in IMAGE_EXTENSIONS:
            continue
        out[rel] = (s.fs.unstrip_protocol(path), int(info.get("size") or 0))
    return out


def _subdirs(s: Storage) -> dict[str, str]:
    """lower-cased name -> name of the folders directly under `s`."""
    try:
        entries = s.fs.ls(s.path, detail=True)
    except FileNotFoundError:
        return {}
    names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]
    return {n.lower(): n for n in names}


def _finished_stage(s: Storage, dirs: dict[str, str]) -> Storage | None:
    """The finished stage folder at `s` (itself, or its only finished child folder, of the listed `dirs`)."""
    try:
        return find_stage_dir(s.url, s.storage_options, children=dirs.values())
    except StageError as e:
        raise StageError(f"evaluate: --heldout {e}") from None


def _by_stem(files: dict[str, tuple[str, int]], where: str) -> dict[str, tuple[str, str, int]]:
    out: dict[str, tuple[str, str, int]] = {}
    for rel, (uri, size) in files.items():
        key = _stem(rel)
        if key in out:
            raise StageError(
                f"evaluate: {where}/{out[key][0]} and {where}/{rel} have the same stem {key!r}; inputs pair "
                "LR and HR by file stem, so keep one of them"
            )
        out[key] = (rel, uri, size)
    return out


def _no_images(url: str) -> StageError:
    return StageError(
        f"evaluate: --heldout {url} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); pass a finished "
        "degrade stage folder, a folder of LR images, or a folder with lr/ (and optionally hr/) subfolders"
    )


def resolve_heldout(url: str, storage_options: dict | None = None) -> tuple[dict, tuple]:
    """What `--heldout url` is: (entry for the plan's `upstream`, input items for the shard spec).

    entry: {"url", "kind": "degrade" | "folder", "fingerprint", ...}; a degrade folder's fingerprint is its
    manifest's, a plain folder's a hash of its files' relative paths and sizes. items: () for a degrade
    folder (its index lists the inputs), else one (sample_id, source, lr URL, lr relpath, hr URL or None,
    hr relpath or None) per LR image, sorted by sample id.
    """
    s = Storage(url, storage_options)
    if not s.fs.exists(s.path):
        raise StageError(
            f"evaluate: --heldout {url} does not exist; pass a degrade stage folder or an image folder"
        )
    if s.fs.isfile(s.path):
        raise StageError(f"evaluate: --heldout {url} is a file; pass the folder that holds the images")
    dirs = _subdirs(s)
    stage_dir = _finished_stage(s, dirs)
    if stage_dir is not None:
        m = read_manifest(stage_dir)
        if m.get("stage") != "degrade":
            raise StageError(
                f"evaluate: --heldout {stage_dir.url} is a finished {m.get('stage')} stage folder; pass a degrade "
                "stage folder (LR/HR pairs) or a folder of your own LR images"
            )
        entry = {"url": stage_dir.url, "kind": "degrade", "fingerprint": m["fingerprint"], "stage": "degrade"}
        return entry, ()

    if "lr" in dirs:
        lr = _by_stem(_images(s, dirs["lr"]), f"{url}/{dirs['lr']}")
        hr = _by_stem(_images(s, dirs["hr"]), f"{url}/{dirs['hr']}") if "hr" in dirs else {}
        lr_dir, hr_dir = dirs["lr"], dirs.get("hr")
    elif "hr" in dirs:
        raise StageError(
            f"evaluate: --heldout {url} has an {dirs['hr']}/ folder but no lr/ folder; put the LR inputs in "
            f"{url}/lr/ (HR images pair with them by file stem)"
        )
    else:
        lr, hr, lr_dir, hr_dir = _by_stem(_images(s), url), {}, "", None
    if not lr:
        raise _no_images(url)

    items, keys = [], []
    for key, (rel, uri, size) in sorted(lr.items()):
        match = hr.get(key) or hr.get(_SCALE_TAG.sub("", key))
        lr_rel = posixpath.join(lr_dir, rel) if lr_dir else rel
        hr_rel = posixpath.join(hr_dir, match[0]) if match else None
        items.append((key, posixpath.basename(key), uri, lr_rel, match[1] if match else None, hr_rel))
        keys.append(f"lr:{lr_rel}|{size}")
        if match:
            keys.append(f"hr:{hr_rel}|{match[2]}")
    with_hr = sum(1 for it in items if it[4] is not None)
    paired = {it[5] for it in items if it[5] is not None}
    entry = {
        "url": s.url,
        "kind": "folder",
        "fingerprint": listing_hash(keys),
        "inputs": len(items),
        "with_hr": with_hr,
        "hr_unpaired": len(hr) - len(paired),
    }
    return entry, tuple(items)


# ---- running: the images ---------------------------------------------------------------------------------------


def _load(uri: str, rel: str, storage_options: dict) -> np.ndarray:
    from dp2o.degrade.ingest import ImageRejected, SourceRef, load_hr

    try:
        return load_hr(SourceRef(uri, rel), min_size=1, storage_options=storage_options)
    except ImageRejected as e:
        raise StageError(
            f"evaluate: held-out image {uri} cannot be used: {e.reason}; fix or remove it"
        ) from None


def load_heldout(entry: dict, items: tuple, storage_options: dict, tmp) -> list[HeldoutInput]:
    """Every held-out input in memory (uint8; a held-out set is a few hundred images at most)."""
    if entry["kind"] == "degrade":
        return _load_degrade(Storage(entry["url"], storage_options), tmp)
    return [
        HeldoutInput(
            sample_id=sid,
            source=source,
            lr=_load(lr_uri, lr_rel, storage_options),
            hr=_load(hr_uri, hr_rel, storage_options) if hr_uri else None,
            lr_name=lr_uri,
            hr_name=hr_uri,
        )
        for sid, source, lr_uri, lr_rel, hr_uri, hr_rel in items
    ]


def _load_degrade(stage_dir: Storage, tmp) -> list[HeldoutInput]:
    from dp2o.storage import local_copy, read_parquet
    from dp2o.tario import TarReader

    out = []
    for shard in read_manifest(stage_dir)["shards"]:
        name = shard["name"]
        index = read_parquet(stage_dir, f"data/{name}.parquet", columns=["sample_id", "source", "status"])
        ok = [r for r in index.to_pylist() if r["status"] == "ok"]
        if not ok:
            continue
        tar_path = local_copy(stage_dir, f"data/{name}.tar", tmp)
        with TarReader(tar_path) as tar:
            for r in ok:
                sid = r["sample_id"]
                where = f"{stage_dir.url}/data/{name}.tar:{sid}"
                out.append(
                    HeldoutInput(
                        sample_id=sid,
                        source=r["source"],
                        lr=tar.image(f"{sid}.lr.png"),
                        hr=tar.image(f"{sid}.hr.png"),
                        lr_name=f"{where}.lr.png",
                        hr_name=f"{where}.hr.png",
                    )
                )
    if not out:
        raise StageError(f"evaluate: the degrade stage {stage_dir.url} has no usable (status ok) LR/HR pairs")
    return out
