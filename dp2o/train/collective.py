"""Collective operations of data-parallel training, usable with or without a process group.

Every function is a no-op (or the identity) when `torch.distributed` is not initialised, so the one training
loop (`dp2o.train.loop`) calls them unconditionally and runs the same code with one process or many.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

#: gradients are all-reduced in flat buckets of at most this many elements (fp32: 256 MiB)
BUCKET = 1 << 26


def world() -> tuple[int, int]:
    """(rank, number of processes) of this training process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(n: int, rank: int, size: int) -> range:
    """The contiguous part of range(n) that `rank` of `size` processes takes (sizes differ by at most one)."""
    return range(rank * n // size, (rank + 1) * n // size)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_parameters(params: Sequence[torch.nn.Parameter], src: int = 0) -> None:
    """Make every rank start from rank `src`'s weights (guards against any unseeded initialisation)."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum `.grad` over the ranks, in place, in flat buckets.

    A parameter without a gradient on every rank keeps `grad=None` (AdamW then skips it, as in one process); one
    with a gradient on some ranks only gets zeros on the others first.
    """
    if world()[1] == 1 or not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = []
    for p, h in zip(params, has.tolist(), strict=True):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            live.append(p)
    bucket: list[torch.nn.Parameter] = []
    for p in live:
        if bucket and (
            sum(q.numel() for q in bucket) + p.numel() > BUCKET
            or (p.grad.dtype, p.grad.device) != (bucket[0].grad.dtype, bucket[0].grad.device)
        ):
            _reduce_bucket(bucket)
            bucket = []
        bucket.append(p)
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(params: list[torch.nn.Parameter]) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def sum_scalars(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum named floats over the ranks (float64; every rank must pass the same keys)."""
    if world()[1] == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


# ---- starting the processes -------------------------------------------------------------------------------------
