"""Data-parallel training inside the train stage: `train.num_processes` processes on one machine, one per GPU.

The stage body starts the processes itself (`torch.multiprocessing.spawn`, a `torch.distributed` process
group over a rendezvous file in the stage's scratch folder; NCCL on CUDA, gloo on CPU), so no launcher
(torchrun, accelerate) is involved and every executor that can run the train stage can run it data-parallel:
the stage is still one task that returns its one shard. Each process rebuilds the backend from a `TrainJob`
(plain, picklable data), runs the same `train_dpo` loop on its share of every step, and rank 0 alone writes
checkpoints and the final outputs.

The design choice a reader would miss: a step's micro-batches are the unit that is split across processes.
Every micro-batch draws its timesteps and noise from (seed, step, its index in the step), exactly as one
process does, and the gradients are summed with an explicit all-reduce; so N processes compute the update of
one process, and the weights differ only by the order of float sums (measured on the tiny model: 0 with one
micro-batch per process; 1.5e-5 after 3 steps with two, where AdamW divides rounding-sized gradients by its eps;
see docs/train.md). One node per train stage: the rendezvous is a local file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from dp2o import stopping
from dp2o.errors import Dp2oError, StageError
from dp2o.train.collective import barrier

#: a collective waits this long for the slowest rank (rank 0 may be uploading a large checkpoint meanwhile)
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class TrainJob:
    """Everything a training process needs, as picklable data; each process builds its own backend and reader.

    images: a picklable factory `images(cache_dir)` returning an object with `candidates(ids, cands)` and
    `lr(ids)` (see `dp2o.train.data.PairImages`); each process gets its own cache folder.
    out: the stage folder (a picklable `Storage`) the checkpoints go under.
    """

    backend: Any  # dp2o.models.BackendConfig
    pairs: pa.Table
    images: Callable[[Path], Any]
    config: Any  # dp2o.config.TrainConfig
    out: Any  # dp2o.storage.Storage


@dataclass
class Trained:
    """What `run_training` hands back: the loop's result and the folder holding the final trainable weights."""

    result: Any  # dp2o.train.loop.TrainResult
    model_dir: Path


# ---- the collectives the loop uses (no-ops in a single process) ------------------------------------------------


def process_devices(backend_cfg, num_processes: int) -> tuple[str, list[str]]:
    """The process-group backend and one device per rank, or a StageError saying how to fix the combination."""
    from dp2o.devices import resolve_device

    device = resolve_device(backend_cfg.device)
    n = num_processes
    if device.type == "cpu":
        return "gloo", ["cpu"] * n
    if device.type != "cuda":
        raise StageError(
            f"train.num_processes={n} runs one process per CUDA GPU (or gloo processes on the CPU), but the "
            f"backend's device is {backend_cfg.device!r}; set train.num_processes=1 or sample.backend.device to "
            "cuda or cpu"
        )
    if device.index is not None:
        raise StageError(
            f"train.num_processes={n} gives rank r the GPU cuda:r, but sample.backend.device={backend_cfg.device!r} "
            "pins one GPU; set sample.backend.device=cuda (choose the GPUs with CUDA_VISIBLE_DEVICES) or "
            "train.num_processes=1"
        )
    visible = torch.cuda.device_count()
    if visible < n:
        raise StageError(
            f"train.num_processes={n} needs {n} GPUs on this machine, but {visible} are visible; set "
            f"train.num_processes={max(1, visible)} (or make more GPUs visible to the train stage)"
        )
    if not dist.is_nccl_available():
        raise StageError(
            f"train.num_processes={n} on CUDA needs a torch build with NCCL; set train.num_processes=1"
        )
    return "nccl", [f"cuda:{r}" for r in range(n)]


def run_training(job: TrainJob, scratch: Path, log: Callable[[str], None] | None = None) -> Trained:
    """Train `job` with `job.config.num_processes` processes; the final weights land in `scratch/model`.

    One process trains right here (and logs to `log`). More are spawned (and this call waits for them); rank 0
    writes the checkpoints under `job.out`, the final weights and the result, which are returned from here, and
    logs to the `dp2o` logger of its process (stderr). A user error in a worker (a `Dp2oError` or
    `ValueError`) comes back as one `StageError`; anything else as torch's exception with the worker's traceback.
    """
    from dp2o.models import build_backend
    from dp2o.train.loop import train_dpo

    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    model_dir = scratch / "model"
    n = job.config.num_processes
    if n == 1:
        backend = build_backend(job.backend)
        images = job.images(scratch / "cache")
        try:
            result = train_dpo(backend, job.pairs, images, job.config, job.out, log)
        finally:
            _close(images)
        backend.save_trainable(model_dir)
        return Trained(result, model_dir)

    pg_backend, devices = process_devices(job.backend, n)
    if job.pairs.num_rows == 0:  # the same message one process gives, without starting any
        raise ValueError(
            "train: the pairs table is empty (every group had zero reward spread?); nothing to train on"
        )
    rendezvous = scratch / "rendezvous"
    rendezvous.unlink(missing_ok=True)
    level = logging.getLogger("dp2o").getEffectiveLevel()
    args = (job, n, pg_backend, devices, str(scratch), str(rendezvous), os.getpid(), level)
    try:
        _spawn_stoppable(args, n)
    except Exception as err:
        failed = sorted(scratch.glob("error-rank*.txt"))
        if failed:
            raise StageError(f"train (num_processes={n}): {failed[0].read_text()}") from err
        raise
    from dp2o.train.loop import TrainResult

    stats = json.loads((scratch / "stats.json").read_text())
    return Trained(TrainResult(pq.read_table(scratch / "metrics.parquet"), stats), model_dir)


def _spawn_stoppable(args: tuple, n: int) -> None:
    """Start the n training processes and wait for them; a stop request (`dp2o.stopping`) terminates them
    (a rerun resumes from the last complete checkpoint) and raises `Stopped`."""
    context = torch.multiprocessing.spawn(_worker, args=args, nprocs=n, join=False)
    try:
        while not context.join(timeout=1.0):
            stopping.check()
    except Exception:
        if not stopping.requested():
            raise  # a worker failed (spawn has terminated the others)
        for p in context.processes:  # stopping (a Ctrl-C also reaches the workers: they may have died of it)
            if p.is_alive():
                p.terminate()
        for p in context.processes:
            p.join(30)
        raise stopping.stopped() from None


def _close(images) -> None:
    close = getattr(images, "close", None)
    if close is not None:
        close()


def _die_with_parent(parent: int) -> None:
    """End this worker when the stage process dies (SIGKILL included), so no orphan keeps writing checkpoints."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:  # portable fallback (and covers a parent that died before prctl)
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="dp2o-parent-watch", daemon=True).start()


def _worker(
    rank: int,
    job: TrainJob,
    size: int,
    pg_backend: str,
    devices: list[str],
    scratch: str,
    rendezvous: str,
    parent: int,
    level: int,
) -> None:
    from dp2o.models import build_backend
    from dp2o.train.loop import train_dpo

    _die_with_parent(parent)
    torch.set_num_threads(1)
    scratch_dir = Path(scratch)
    logger = logging.getLogger("dp2o")
    if rank == 0 and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    device = devices[rank]
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(
            pg_backend, init_method=f"file://{rendezvous}", rank=rank, world_size=size, timeout=TIMEOUT
        )
        backend = build_backend(job.backend.model_copy(update={"device": device}))
        images = job.images(scratch_dir / f"cache-rank{rank}")
        try:
            result = train_dpo(backend, job.pairs, images, job.config, job.out)
        finally:
            _close(images)
        if rank == 0:
            backend.save_trainable(scratch_dir / "model")
            pq.write_table(result.metrics, scratch_dir / "metrics.parquet")
            (scratch_dir / "stats.json").write_text(json.dumps(result.stats))
        barrier()
        # only after success: tearing down while the other ranks wait in a collective can hang (NCCL); on a
        # failure this process exits and `spawn` terminates the others
        dist.destroy_process_group()
    except (Dp2oError, ValueError) as e:  # the user's to fix: the parent raises it as one line
        (scratch_dir / f"error-rank{rank}.txt").write_text(f"rank {rank}: {e}")
        raise
