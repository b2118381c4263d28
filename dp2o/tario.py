"""Image tar shards (webdataset layout): deterministic writing, indexed random reads, PNG coding.

Members are `<key>.<ext>` with no dot in `<key>`, which is how webdataset groups files into samples, so every
image shard can be streamed with `webdataset.WebDataset(url)` as well as read here. Writing is byte-
deterministic (fixed mtime, owner and order) so that a shard recomputed after a crash is identical to the one
an uninterrupted run writes.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
    """Random access to members of a local tar file by name (offsets indexed once)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._index: dict[str, tuple[int, int]] = {}
        with tarfile.open(self.path, "r") as tf:
            for m in tf:
                if m.isfile():
                    self._index[m.name] = (m.offset_data, m.size)
        self._f = open(self.path, "rb")  # noqa: SIM115 - kept open for repeated reads, closed in close()

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
        return self._f.read(size)

    def image(self, name: str) -> np.ndarray:
        return decode_png(self.read(name))

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def image_shard(name: str, tmp: Path, table, members: list[tuple[str, bytes]]):
    """Write an image stage's shard locally: the Parquet index (`table`, with a `status` column) and the tar
    of PNGs, as a `ShardOutput` ready for the driver to commit."""
    from dp2o.storage import ShardOutput, write_parquet

    pq_path, tar_path = tmp / f"{name}.parquet", tmp / f"{name}.tar"
    write_parquet(table, pq_path)
    write_tar(tar_path, members)
    errors = sum(s != "ok" for s in table["status"].to_pylist())
    return ShardOutput(
        name,
        {f"data/{name}.parquet": str(pq_path), f"data/{name}.tar": str(tar_path)},
        rows=table.num_rows,
        errors=errors,
    )
