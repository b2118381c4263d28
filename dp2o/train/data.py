"""Random access to the images a training step needs: winner and loser candidates and their LR input.

Candidates live in the sample stage's tar shards and LR inputs in the degrade stage's, both named by shard.
Remote shards are copied once into a local cache folder and read by member offset, so a step costs a few
seeks, not a scan, and the full dataset never has to fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dp2o import storage as dio
from dp2o.storage import Storage
from dp2o.tario import TarReader, to_tensor01


class PairImages:
    """Images of (sample_id, candidate) pairs from finished sample and degrade stage folders."""

    def __init__(self, sample_dir: Storage, degrade_dir: Storage, cache_dir: str | Path):
        self.sample_dir, self.degrade_dir = sample_dir, degrade_dir
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._shard_of: dict[str, str] = {}
        manifest = sample_dir.read_json(dio.MANIFEST)
        for s in manifest["shards"]:
            ids = dio.read_parquet(sample_dir, f"data/{s['name']}.parquet", ["sample_id"])[
                "sample_id"
            ].to_pylist()
            for sid in ids:
                self._shard_of[sid] = s["name"]
        self._readers: dict[tuple[str, str], TarReader] = {}

    def _reader(self, which: str, shard: str) -> TarReader:
        key = (which, shard)
        if key not in self._readers:
            st = self.sample_dir if which == "sample" else self.degrade_dir
            rel = f"data/{shard}.tar"
            if st.local:
                path = Path(st.p(rel))
            else:
                path = self.cache_dir / f"{which}-{shard}.tar"
                if not path.exists():
                    tmp = path.with_suffix(".part")
                    st.download(rel, to=tmp)
                    tmp.replace(path)
            self._readers[key] = TarReader(path)
        return self._readers[key]

    def shard_of(self, sample_id: str) -> str:
        try:
            return self._shard_of[sample_id]
        except KeyError:
            raise KeyError(
                f"sample {sample_id!r} is not in the sample stage at {self.sample_dir.url}"
            ) from None

    def candidates(self, sample_ids: Sequence[str], candidates: Sequence[int]) -> torch.Tensor:
        """float [B, 3, H, W] in [0, 1]."""
        from dp2o.sample import candidate_key

        return to_tensor01(
            self._reader("sample", self.shard_of(s)).image(f"{candidate_key(s, int(c))}.sr.png")
            for s, c in zip(sample_ids, candidates, strict=True)
        )

    def lr(self, sample_ids: Sequence[str]) -> torch.Tensor:
        """float [B, 3, h, w] in [0, 1]."""
        return to_tensor01(self._reader("degrade", self.shard_of(s)).image(f"{s}.lr.png") for s in sample_ids)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()
