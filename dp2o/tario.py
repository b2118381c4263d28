"""Image tar shards (webdataset layout): deterministic writing, indexed random reads, PNG coding.

Members are `<key>.<ext>` with no dot in `<key>`, which is how webdataset groups files into samples, so every
image shard can be streamed with `webdataset.WebDataset(url)` as well as read here. Writing is byte-
deterministic (fixed mtime, owner and order) so that a shard recomputed after a crash is identical to the one
an uninterrupted run writes.

Reading a committed shard is verified: `TarReader` finds what the shard's marker recorded (dp2o.storage) and
checks each member's bytes against its sha256 the first time it reads that member, so a reader that needs a
few members of a large shard hashes only those, and a damaged member is a `StageError` naming the shard and
the repair command, never a PNG decoder's error or silently wrong pixels.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dp2o import storage
from dp2o.errors import StageError

PNG_COMPRESS_LEVEL = 3


def encode_png(img: np.ndarray) -> bytes:
    """img: uint8 [H, W, 3] RGB -> PNG bytes (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img), mode="RGB").save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, 3] RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def to_tensor01(imgs: Iterable[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images (same size) -> float [B, 3, H, W] in [0, 1]."""
    arr = np.stack(list(imgs))
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8_hwc(t: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (rounded, clipped)."""
    return t.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> int:
    """Write (name, bytes) members in the given order; returns the member count."""
    n = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
            n += 1
    return n


class TarReader:
    """Random access to members of a local tar file by name (offsets indexed once), each member checked against
    the sha256 its shard's marker records before it is returned.

    What a member is checked against: `member_sha256` when given; else what `storage.origin_of(path)` finds (a
    verified copy made by `local_copy`/`Storage.download` in this process, needing no further check, or a file
    of a local stage folder). A marker written before per-member digests existed makes the whole file be
    hashed once instead. A tar that is no committed shard file is read unchecked.
    """

    def __init__(
        self,
        path: str | Path,
        member_sha256: Mapping[str, str] | None = None,
        *,
        origin: storage.Committed | None = None,
    ):
        self.path = str(path)
        if origin is None and member_sha256 is None:
            origin = storage.origin_of(self.path)
        self._origin = origin
        expected = member_sha256 if member_sha256 is not None else origin and origin.member_sha256
        if origin is not None and (expected is None or storage.whole_verified(self.path, origin)):
            storage.verify_local(self.path, origin)
            expected = None
        #: {member: sha256} still to be checked on read; None when nothing is left to check
        self._expected = expected
        self._checked: set[str] = set()
        self._index: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(self.path, "r") as tf:
                for m in tf:
                    if m.isfile():
                        self._index[m.name] = (m.offset_data, m.size)
        except tarfile.TarError as e:
            if expected is None:
                raise
            raise self._corrupted(f"unreadable tar headers ({e})") from None
        if expected is not None and self._index.keys() != expected.keys():
            missing = _some(expected.keys() - self._index.keys())
            extra = _some(self._index.keys() - expected.keys())
            raise self._corrupted(
                f"members differ from the committed ones (missing {missing}; unexpected {extra})"
            )
        self._f = open(self.path, "rb")  # noqa: SIM115 - kept open for repeated reads, closed in close()

    def _corrupted(self, what: str) -> StageError:
        if self._origin is not None:
            return self._origin.corrupted(what)
        return StageError(f"{self.path} is corrupted: {what}")

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        return list(self._index)

    def read(self, name: str) -> bytes:
        try:
            off, size = self._index[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in {self.path}") from None
        self._f.seek(off)
        data = self._f.read(size)
        if self._expected is not None and name not in self._checked:
            got, want = hashlib.sha256(data).hexdigest(), self._expected[name]
            if got != want:
                raise self._corrupted(
                    f"member {name} has sha256 {got[:16]}..., the marker recorded {want[:16]}..."
                )
            self._checked.add(name)
        return data

    def image(self, name: str) -> np.ndarray:
        """The member `name` decoded: uint8 [H, W, 3] RGB."""
        return decode_png(self.read(name))

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _some(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "") or "none"


def image_shard(name: str, tmp: Path, table, members: list[tuple[str, bytes]]):
    """Write an image stage's shard locally: the Parquet index (`table`, with a `status` column) and the tar
    of PNGs, as a `ShardOutput` ready for the driver to commit."""
    pq_path, tar_path = tmp / f"{name}.parquet", tmp / f"{name}.tar"
    storage.write_parquet(table, pq_path)
    write_tar(tar_path, members)
    errors = sum(s != "ok" for s in table["status"].to_pylist())
    return storage.ShardOutput(
        name,
        {f"data/{name}.parquet": str(pq_path), f"data/{name}.tar": str(tar_path)},
        rows=table.num_rows,
        errors=errors,
    )
