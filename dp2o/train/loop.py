"""One readable weighted Diffusion-DPO training loop with full-state, crash-safe checkpoints.

config → backend (policy + frozen reference) → AdamW → loop over steps; each step draws `pairs_per_step` pairs,
processes them in micro-batches (gradient accumulation), and logs the loss and implicit accuracy. The design
choice a reader would miss: nothing in a step depends on RNG *state*. The pairs of step k, and every timestep
and noise draw in it, come from generators seeded by (seed, step, micro-batch index in the step), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have — the checkpoint only needs the
weights, the optimiser and scheduler state, and the metrics so far.

The same loop runs data-parallel when called inside a `torch.distributed` process group (started by
`dp2o.train.distributed` for `train.num_processes > 1`): each rank takes a contiguous share of every step's
micro-batches (still seeded by their index in the step, never by the rank), gradients and logged sums are
summed over the ranks before the update, and rank 0 alone writes checkpoints. Outside a process group every
collective is a no-op.

Checkpoints follow the commit protocol: files first, `COMPLETE.json` last, old checkpoints deleted only after
the new one is complete; "latest" is the newest *complete* checkpoint.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dp2o import stopping
from dp2o import storage as dio
from dp2o.config import TrainConfig, canonical
from dp2o.models.base import Backend, NoisedBatch
from dp2o.progress import within
from dp2o.seeding import derive_seed, numpy_rng, torch_generator
from dp2o.storage import Storage
from dp2o.train.collective import (
    barrier,
    broadcast_object,
    broadcast_parameters,
    share,
    sum_gradients,
    sum_scalars,
    world,
)
from dp2o.train.losses import dpo_loss

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")

#: DPO beta when the config leaves it unset: METHOD.md's 5000 for ε/v diffusion; flow DPO in other work uses
#: a much smaller beta (≈100–2000), we default to 1000 (ours)
DEFAULT_BETA = {"epsilon": 5000.0, "v_prediction": 5000.0, "flow": 1000.0}

METRIC_COLUMNS = (
    "step",
    "loss",
    "implicit_acc",
    "lr",
    "err_w",
    "err_l",
    "err_ref_w",
    "err_ref_l",
    "reward_margin",
    "weight",
    "grad_norm",
)


@dataclass
class TrainResult:
    metrics: pa.Table
    stats: dict = field(default_factory=dict)


def pair_indices(step: int, pairs_per_step: int, num_pairs: int, seed: int) -> np.ndarray:
    """Indices of the pairs used at `step`: consecutive slices of per-epoch permutations (seeded by epoch)."""
    pos = np.arange(step * pairs_per_step, (step + 1) * pairs_per_step, dtype=np.int64)
    epochs, offsets = pos // num_pairs, pos % num_pairs
    out = np.empty_like(pos)
    for e in np.unique(epochs):
        perm = numpy_rng(derive_seed(seed, "train", "epoch", int(e))).permutation(num_pairs)
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


def share_noise(batch: NoisedBatch, n: int) -> NoisedBatch:
    """Winners are rows [0, n), losers [n, 2n): give each loser its winner's timestep and noise."""
    return NoisedBatch(
        x0=batch.x0,
        noise=torch.cat([batch.noise[:n], batch.noise[:n]]),
        t=torch.cat([batch.t[:n], batch.t[:n]]),
        cond=batch.cond,
    )


# ---- checkpoints -------------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(out: Storage) -> list[int]:
    """Steps of checkpoints whose COMPLETE.json exists and whose files have the recorded sizes, ascending."""
    steps = []
    for name in out.listdir(CHECKPOINTS):
        m = _STEP_DIR.match(name)
        if not m or not out.exists(CHECKPOINTS, name, "COMPLETE.json"):
            continue
        info = out.read_json(CHECKPOINTS, name, "COMPLETE.json")
        try:
            if all(out.size(CHECKPOINTS, name, rel) == size for rel, size in info["files"].items()):
                steps.append(int(m.group(1)))
        except FileNotFoundError:
            continue
    return sorted(steps)


def save_checkpoint(
    out: Storage, step: int, backend: Backend, opt, sched, metrics: list[dict], cfg: TrainConfig
) -> None:
    name = checkpoint_name(step)
    with out.local_tmpdir() as tmp:
        tmp = Path(tmp)
        backend.save_trainable(tmp / "model")
        torch.save(
            {
                "step": step,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "config": canonical(cfg),
            },
            tmp / "state.pt",
        )
        pq.write_table(pa.Table.from_pylist(metrics), tmp / "metrics.parquet")
        sizes = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            sizes[rel] = f.stat().st_size
            out.put_atomic(f, CHECKPOINTS, name, rel)
    out.write_json_atomic(
        {"step": step, "files": sizes, "created": dio.now_iso()}, CHECKPOINTS, name, "COMPLETE.json"
    )
    for old in complete_checkpoints(out)[: -cfg.keep_last]:
        out.rm(CHECKPOINTS, checkpoint_name(old), recursive=True)


def load_checkpoint(out: Storage, step: int, backend: Backend, opt, sched) -> list[dict]:
    name = checkpoint_name(step)
    info = out.read_json(CHECKPOINTS, name, "COMPLETE.json")
    with tempfile.TemporaryDirectory(prefix="dp2o-ckpt-") as tmp:
        tmp = Path(tmp)
        for rel in info["files"]:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with out.open(CHECKPOINTS, name, rel) as src:
                dest.write_bytes(src.read())
        backend.load_trainable(tmp / "model")
        state = torch.load(tmp / "state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return pq.read_table(tmp / "metrics.parquet").to_pylist()


def _quiet(_: str) -> None:
    """The log of ranks other than 0."""


def optimiser(backend: Backend, cfg: TrainConfig):
    """(trainable parameters, AdamW, linear warm-up schedule) of `cfg` for `backend`'s policy."""
    params = [p for p in backend.trainable_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return params, opt, sched


# ---- the loop --------------------------------------------------------------------------------------------------------


def train_dpo(
    backend: Backend,
    pairs: pa.Table,
    images,
    cfg: TrainConfig,
    out: Storage,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train `backend`'s policy on `pairs` (sample_id, win, lose[, weight]); checkpoints go under `out`.

    images: provides `candidates(sample_ids, candidate_ids)` and `lr(sample_ids)` as float [B,3,H,W] in [0, 1]
    (see `dp2o.train.data.PairImages`). Resumes from the newest complete checkpoint in `out` if there is one.
    In a process group every rank calls this with the same arguments; all return the same result.
    """
    rank, size = world()
    if rank > 0:
        log = _quiet
    log = log or logging.getLogger("dp2o").info
    n_pairs = pairs.num_rows
    if n_pairs == 0:
        raise ValueError(
            "train: the pairs table is empty (every group had zero reward spread?); nothing to train on"
        )
    sample_ids = np.asarray(pairs["sample_id"].to_pylist(), dtype=object)
    win = pairs["win"].to_numpy()
    lose = pairs["lose"].to_numpy()
    weight = (
        pairs["weight"].to_numpy().astype(np.float32)
        if "weight" in pairs.column_names
        else np.ones(n_pairs, np.float32)
    )
    beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA[backend.prediction_type]

    params, opt, sched = optimiser(backend, cfg)

    metrics: list[dict] = []
    # rank 0 picks the checkpoint and every rank loads that one (rank 0 only deletes old ones after this step)
    done = complete_checkpoints(out) if rank == 0 else []
    start = broadcast_object(done[-1] if done else 0)
    if start:
        # older checkpoints also held a wall-clock `seconds` column: data files hold results only
        metrics = [
            {k: r.get(k) for k in METRIC_COLUMNS} for r in load_checkpoint(out, start, backend, opt, sched)
        ]
        log(f"train: resumed from {out.join_url(CHECKPOINTS, checkpoint_name(start))}")
    broadcast_parameters(params)

    backend.train()
    step_seconds: list[float] = []
    bar = within("train", cfg.steps, "steps", lines=False)  # a bar on a terminal; the loop logs its own lines
    bar.update(start)
    for step in bar.over(range(start, cfg.steps)):
        stopping.check()  # between steps: the last complete checkpoint is where a rerun resumes
        t0 = time.perf_counter()
        idx = pair_indices(step, cfg.pairs_per_step, n_pairs, cfg.seed)
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        starts = range(0, len(idx), cfg.micro_batch)
        for mb in share(len(starts), rank, size):  # all of them in one process
            lo = starts[mb]
            sel = idx[lo : lo + cfg.micro_batch]
            n = len(sel)
            ids = sample_ids[sel].tolist()
            targets = torch.cat([images.candidates(ids, win[sel]), images.candidates(ids, lose[sel])])
            lr = images.lr(ids)
            gen = torch_generator(derive_seed(cfg.seed, "train", step, mb))
            batch = share_noise(
                backend.make_noised_batch(targets, torch.cat([lr, lr]), gen, t_range=cfg.timestep_range),
                n,
            )
            err, err_ref = backend.prediction_errors(batch)
            w = torch.from_numpy(weight[sel]).to(err.device)
            loss, logs = dpo_loss(err[:n], err_ref[:n], err[n:], err_ref[n:], beta=beta, weight=w)
            (loss * (n / len(idx))).backward()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
        # each rank scaled its losses by the global batch size, so the sum is the one-process gradient
        sum_gradients(params)
        sums = sum_scalars(sums, params[0].device if params else torch.device("cpu"))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        current_lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        row = {k: sums.get(k, float("nan")) / len(idx) for k in METRIC_COLUMNS if k in sums}
        row.update(step=step + 1, lr=current_lr, grad_norm=float(grad_norm))
        metrics.append({k: row.get(k) for k in METRIC_COLUMNS})
        step_seconds.append(
            time.perf_counter() - t0
        )  # wall clock: logs and the marker's stats, not the table
        if step == start or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log(
                f"train: step {step + 1}/{cfg.steps} loss {row['loss']:.4f} implicit_acc {row['implicit_acc']:.3f} "
                f"lr {current_lr:.2e} ({step_seconds[-1]:.2f}s)"
            )
        if rank == 0 and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(out, step + 1, backend, opt, sched, metrics, cfg)
    barrier()
    backend.eval()
    table = pa.Table.from_pylist(metrics) if metrics else pa.table({k: [] for k in METRIC_COLUMNS})
    last = metrics[-1] if metrics else {}
    window = max(1, min(5, len(metrics) // 2))  # single steps are noisy with few pairs: report window means

    def mean_of(rows: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    stats = {
        "steps": cfg.steps,
        "resumed_from": start,
        "pairs": n_pairs,
        "beta": beta,
        "final_loss": last.get("loss"),
        "final_implicit_acc": last.get("implicit_acc"),
        "first_loss": metrics[0]["loss"] if metrics else None,
        "window": window,
        "loss_first_window": mean_of(metrics[:window], "loss"),
        "loss_last_window": mean_of(metrics[-window:], "loss"),
        "implicit_acc_last_window": mean_of(metrics[-window:], "implicit_acc"),
        "seconds_per_step": float(np.mean(step_seconds)) if step_seconds else None,
    }
    return TrainResult(table, stats)
