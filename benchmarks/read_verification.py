"""What verifying reads costs: sha256 of committed shard files on the read paths of downstream stages.

    python -m benchmarks.read_verification               # 512 MiB file, 256 MiB Parquet, 256 MiB of PNGs
    python -m benchmarks.read_verification --size-mb 64  # a smoke run

Named baseline: the same read without verification, in the same run on the same (page-cached) bytes: a plain
chunked read of a whole file, `pq.read_table` of a Parquet file, `TarReader` reads of every member of a tar
that is no committed shard (no checks), `shutil.copyfile` for a copy. (`pq.read_table` of the stage folder's
fsspec file for Parquet: what `read_parquet` did before it verified.) Each row reports seconds per GiB of file
bytes, verified and unverified, and the difference: the cost of verification per GiB. Reads are from the page
cache, so this is the CPU cost, the worst case relative to a disk or network read, which is slower still.
Every timing is the best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dp2o import storage
from dp2o.storage import ShardOutput, Storage, commit_shard, local_copy, read_parquet
from dp2o.tario import TarReader, encode_png, write_tar

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=512, help="size of the whole-file test (MiB)")
    p.add_argument(
        "--png-px", type=int, default=512, help="side of the PNG members (a 4x SR output of 128 px)"
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "read_verification")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "read_verification.json")
    return p.parse_args(argv)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_pair(verified, baseline, repeat: int) -> tuple[float, float]:
    """Best times of the two, measured alternately so a busy machine slows both alike."""
    pairs = [(best(verified, 1), best(baseline, 1)) for _ in range(repeat)]
    return min(v for v, _ in pairs), min(b for _, b in pairs)


def forget() -> None:
    """Drop this process's record of verified files, so the next read hashes again (what a new process does)."""
    storage._VERIFIED.clear()
    storage._COPIES.clear()


def row(name: str, nbytes: int, times: tuple[float, float], baseline: str, **extra) -> dict:
    v, b = (t * GIB / nbytes for t in times)
    return {
        "read": name,
        "bytes": nbytes,
        "verified_s_per_gib": round(v, 4),
        "baseline": baseline,
        "baseline_s_per_gib": round(b, 4),
        "cost_s_per_gib": round(v - b, 4),
        "overhead_pct": round(100 * (v - b) / b, 1),
        **extra,
    }


def commit(stage: Storage, name: str, files: dict[str, Path]) -> None:
    commit_shard(
        stage, ShardOutput(name, {k: str(v) for k, v in files.items()}), fingerprint="bench", seconds=0
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    stage = Storage(str(args.work / "stage"))
    stage.write_json_atomic({"stage": "bench", "fingerprint": "bench"}, "config.json")
    rng = np.random.default_rng(0)
    results = []
    load_start = os.getloadavg()[0]

    # 1. sha256 alone, on bytes in memory
    buf = rng.integers(0, 256, 256 << 20, dtype=np.uint8).tobytes()
    t = best(lambda: hashlib.sha256(buf).hexdigest(), args.repeat)
    sha_gibps = len(buf) / GIB / t

    # 2. a whole file (any file a stage reads whole): chunked read vs read + hash
    blob = args.work / "blob.bin"
    with open(blob, "wb") as f:
        for _ in range(args.size_mb // 256 or 1):
            f.write(buf[: min(len(buf), args.size_mb << 20)])
    commit(stage, "shard-00000", {"data/shard-00000.bin": blob})
    path = Path(stage.p("data/shard-00000.bin"))
    size = path.stat().st_size

    def plain_read() -> None:
        with open(path, "rb") as f:
            while f.read(storage.CHUNK):
                pass

    def verified_read() -> None:
        forget()
        storage.verify_committed(stage, "data/shard-00000.bin")

    plain_read()  # into the page cache
    results.append(
        row(
            "whole file (verify_committed)",
            size,
            best_pair(verified_read, plain_read, args.repeat),
            "chunked read, no hash",
        )
    )

    # 3. a copy (local_copy of an object-store file hashes while it copies; here local to local)
    dest = args.work / "copy.bin"
    c = storage.committed_file(stage, "data/shard-00000.bin")
    results.append(
        row(
            "copy (download hashed while copied)",
            size,
            best_pair(
                lambda: (forget(), storage._copy_verified(stage, c, dest)),
                lambda: shutil.copyfile(path, dest),
                args.repeat,
            ),
            "shutil.copyfile",
        )
    )
    path.unlink()
    dest.unlink()

    # 4. Parquet: a score-like table, first read in a process (hashed) vs pq.read_table
    n = max(1, (args.size_mb // 2) << 20) // 80
    table = pa.table(
        {
            "sample_id": pa.array([f"img-{i // 32:08d}" for i in range(n)]),
            "candidate": pa.array(np.arange(n) % 32, pa.int32()),
            "seed": pa.array(rng.integers(0, 2**62, n)),
            **{
                m: pa.array(rng.random(n))
                for m in ("psnr", "ssim", "lpips", "dists", "musiq", "maniqa", "clipiqa")
            },
        }
    )
    storage.write_parquet(table, args.work / "t.parquet")
    commit(stage, "shard-00001", {"data/shard-00001.parquet": args.work / "t.parquet"})
    ppath = stage.p("data/shard-00001.parquet")
    psize = os.path.getsize(ppath)

    def first_read() -> None:
        forget()
        read_parquet(stage, "data/shard-00001.parquet")

    def unverified() -> None:  # read_parquet before verification
        with stage.open("data/shard-00001.parquet") as f:
            pq.read_table(f)

    def later_read() -> None:
        read_parquet(stage, "data/shard-00001.parquet")

    unverified()
    for what, fn in (("first read in a process", first_read), ("later reads, hashed already", later_read)):
        fn()
        results.append(
            row(
                f"parquet, {what} (read_parquet)",
                psize,
                best_pair(fn, unverified, args.repeat),
                "pq.read_table of the fsspec file (read_parquet unverified)",
                rows=n,
            )
        )

    # 5. a tar of PNGs read member by member: per-member sha256 vs the same reads unchecked
    px = args.png_px
    yy, xx = np.mgrid[0:px, 0:px]
    smooth = np.stack([(xx + yy) % 256, (2 * xx) % 256, (3 * yy) % 256], -1).astype(np.int16)
    one = encode_png(np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8))
    count = max(8, ((args.size_mb // 2) << 20) // len(one))
    members = [(f"img-{i:06d}_000.sr.png", one) for i in range(count)]
    write_tar(args.work / "t.tar", members)
    shutil.copyfile(args.work / "t.tar", args.work / "plain.tar")  # no committed shard: read unchecked
    commit(stage, "shard-00002", {"data/shard-00002.tar": args.work / "t.tar"})
    tsize = os.path.getsize(stage.p("data/shard-00002.tar"))
    names = [m for m, _ in members]

    def read_all(tar_path, decode: bool) -> None:
        with TarReader(tar_path) as tar:
            for m in names:
                tar.image(m) if decode else tar.read(m)

    verified_tar = local_copy(stage, "data/shard-00002.tar", args.work)
    for decode, what in ((False, "bytes"), (True, "decoded PNGs")):
        results.append(
            row(
                f"tar members, {what} (TarReader, per-member sha256)",
                tsize,
                best_pair(
                    lambda d=decode: read_all(verified_tar, d),
                    lambda d=decode: read_all(args.work / "plain.tar", d),
                    args.repeat,
                ),
                f"TarReader on an unchecked tar, {what}",
                members=count,
                member_bytes=len(one),
            )
        )

    record = {
        "benchmark": "read_verification",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
            "sha_ni": "sha_ni" in Path("/proc/cpuinfo").read_text()
            if Path("/proc/cpuinfo").exists()
            else None,
        },
        "load_average_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "sha256_gib_per_s": round(sha_gibps, 3),
        "sha256_s_per_gib": round(1 / sha_gibps, 4),
        "results": results,
    }
    shutil.rmtree(args.work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
