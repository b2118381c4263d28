"""The controlled miniature: DP²O-SR's multi-pair DPO next to controls that can each show "nothing is learned",
evaluated on photos it never trained on, with photos as the unit of inference.

    python -m scripts.mini_controls                  # the pre-registered run (docs/mini_controls/protocol.json)
    python -m scripts.mini_controls --pilot          # the pilot on training photos only (MDE, loss check)
    python -m scripts.mini_controls --report-only    # rebuild docs/mini_controls.md from finished runs

Every parameter comes from the protocol file, committed before the run (docs/mini_controls.md names the
commit); the command line only chooses the mode, the folders and the parallelism. Arms, each trained once per
training seed with the same steps, pairs per step, optimiser and timestep range:

- `dp2o`           multi-pair DPO (N of M, HPO weights) on the hybrid reward: the method;
- `shuffled`       the same pairs with winner and loser swapped at random per pair (seeded by the training seed,
                   so seed k of both arms draws the same pairs, timesteps and noise): a negative control;
- `sft-winners`    supervised fine-tuning (the denoising loss) on the winners of the same pairs: a positive
                   control; if it cannot move held-out reward, the set-up cannot detect anything;
- `fidelity-only`  multi-pair DPO with the fidelity metric alone as reward;
- `realism-only`   multi-pair DPO with the realism metric alone as reward.

Evaluation: M_eval candidates per crop of every held-out photo, the same seeds for every arm and the base model,
scored with every metric; the hybrid reward uses bounds fitted once on the base model's training candidates and
frozen. The statistic is arm − base of Mean@M per photo (mean over its crops, candidates and the arm's seeds);
intervals are over held-out photos (Student t) and a photo × seed bootstrap.

Resumable: each finished (arm, seed) run writes its held-out scores and training record under `--work-dir`
(file renamed into place last); a rerun skips them, and `--report-only` reports whatever has finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dp2o.data import bundled_path
from dp2o.degrade.config import DegradationConfig
from dp2o.degrade.crops import degraded_crops
from dp2o.degrade.ingest import SourceRef, load_hr
from dp2o.degrade.pipeline import min_hr_side
from dp2o.evaluate import sample_candidates
from dp2o.evaluate.at_m import t_interval
from dp2o.evaluate.scoring import RewardModel
from dp2o.models.tiny import TinyBackend, bundled_weights_dir
from dp2o.pairs.build import build_pairs
from dp2o.reward.hybrid import RewardConfig
from dp2o.seeding import derive_seed, numpy_rng, torch_generator
from scripts.mini_repro import MemoryImages, _exit_with_parent

PROTOCOL = Path("docs/mini_controls/protocol.json")
ARMS = ("dp2o", "shuffled", "sft-winners", "fidelity-only", "realism-only")
#: what each arm trains on: (reward: "hybrid" | "fidelity" | "realism", objective, labels)
ARM_RECIPES = {
    "dp2o": ("hybrid", "dpo", "real"),
    "shuffled": ("hybrid", "dpo", "shuffled"),
    "sft-winners": ("hybrid", "sft", "real"),
    "fidelity-only": ("fidelity", "dpo", "real"),
    "realism-only": ("realism", "dpo", "real"),
}
REQUIRED = (
    "train_photos",
    "heldout_photos",
    "crop",
    "train_crops_per_photo",
    "eval_crops_per_photo",
    "m",
    "n_top",
    "weighting",
    "m_eval",
    "steps",
    "pairs_per_step",
    "micro_batch",
    "learning_rate",
    "warmup_steps",
    "beta",
    "t_range",
    "num_inference_steps",
    "seeds",
    "data_seed",
    "reward_metrics",
    "fidelity_metric",
    "realism_metric",
    "arms",
    "bootstrap",
)


# ---- the protocol -----------------------------------------------------------------------------------------------
def load_protocol(path: Path) -> dict:
    """The protocol file, checked: every field present, photos disjoint, N ≤ M/2, arms known."""
    try:
        proto = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: no protocol file; the run reads every parameter from it") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); fix the file") from None
    missing = [k for k in REQUIRED if k not in proto]
    if missing:
        raise SystemExit(f"{path}: missing fields {missing}")
    both = set(proto["train_photos"]) & set(proto["heldout_photos"])
    if both:
        raise SystemExit(f"{path}: photos {sorted(both)} are in both the training and the held-out split")
    if not 1 <= proto["n_top"] <= proto["m"] // 2:
        raise SystemExit(f"{path}: need 1 <= n_top <= m/2, got n_top={proto['n_top']} m={proto['m']}")
    unknown = sorted(set(proto["arms"]) - set(ARMS))
    if unknown:
        raise SystemExit(f"{path}: unknown arms {unknown}; known: {', '.join(ARMS)}")
    for name in (*proto["train_photos"], *proto["heldout_photos"]):
        if not bundled_path(name).exists():
            raise SystemExit(
                f"{path}: photo {name} is not installed ({bundled_path(name)}); see dp2o/data.py"
            )
    return proto


def protocol_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ---- data -------------------------------------------------------------------------------------------------------
def photo_crops(names: list[str], per_photo: int, crop: int, seed: int, stage: str):
    """`per_photo` degraded crops of each named bundled photo → (ids, hr uint8, lr uint8, photo of each id).
    Crops cycle over the photos, so crop i belongs to photo i mod len(names)."""
    cfg = DegradationConfig()
    photos = [
        load_hr(SourceRef(str(bundled_path(n)), n), min_size=max(crop, min_hr_side(cfg))) for n in names
    ]
    n = per_photo * len(names)
    hr, lr = degraded_crops(photos, n, crop, seed, stage, cfg)
    ids = [f"{stage}-{i:04d}" for i in range(n)]
    return ids, hr, lr, {sid: names[i % len(names)] for i, sid in enumerate(ids)}


def candidate_seed(seed: int, what: str, sample_id: str, c: int) -> int:
    return derive_seed(seed, what, sample_id, c) % 2**63


def load_base(proto: dict, model_dir: str) -> TinyBackend:
    backend = TinyBackend.from_pretrained(model_dir)
    backend.num_inference_steps = proto["num_inference_steps"]
    return backend


def eval_metric_names(proto: dict) -> list[str]:
    names = [n for n in proto["reward_metrics"].split(",") if n]
    for extra in (proto["fidelity_metric"], proto["realism_metric"]):
        if extra not in names:
            names.append(extra)
    return names


# ---- training ---------------------------------------------------------------------------------------------------
def arm_pairs(proto: dict, arm: str, seed: int, rewards: dict[str, pa.Table]) -> pa.Table:
    """The pairs arm `arm` trains on with training seed `seed` (win, lose, weight per sample_id)."""
    reward, _, labels = ARM_RECIPES[arm]
    table = rewards[reward]
    pairs, _ = build_pairs(
        table["sample_id"],
        table["candidate"],
        table["reward"],
        n_top=proto["n_top"],
        weighting=proto["weighting"],
    )
    if labels == "shuffled":
        pairs = shuffle_labels(pairs, seed)
    return pairs


def shuffle_labels(pairs: pa.Table, seed: int) -> pa.Table:
    """Winner and loser swapped in a random half of the pairs (a coin per pair, seeded by the training seed)."""
    flip = numpy_rng(derive_seed(seed, "mini-controls", "shuffle")).random(pairs.num_rows) < 0.5
    win, lose = pairs["win"].to_numpy(), pairs["lose"].to_numpy()
    new_win, new_lose = np.where(flip, lose, win), np.where(flip, win, lose)
    out = pairs.set_column(pairs.schema.get_field_index("win"), "win", pa.array(new_win))
    return out.set_column(out.schema.get_field_index("lose"), "lose", pa.array(new_lose))


def train_config(proto: dict, seed: int):
    from dp2o.config import TrainConfig

    return TrainConfig(
        steps=proto["steps"],
        pairs_per_step=proto["pairs_per_step"],
        micro_batch=proto["micro_batch"],
        learning_rate=proto["learning_rate"],
        beta=proto["beta"],
        warmup_steps=proto["warmup_steps"],
        timestep_range=tuple(proto["t_range"]),
        seed=seed,
        checkpoint_every=proto["steps"],
        log_every=max(1, proto["steps"] // 4),
    )


def train_sft(backend: TinyBackend, pairs: pa.Table, images: MemoryImages, cfg, log=print) -> dict:
    """Supervised fine-tuning on the winners of `pairs` with DPO's budget: the same steps, pair order (the
    winner of each drawn pair is the target), timesteps, noise, optimiser, warm-up and clipping as `train_dpo`
    with the same config; the loss is the weighted denoising error of the policy alone."""
    from dp2o.train.loop import optimiser, pair_indices

    sample_ids = np.asarray(pairs["sample_id"].to_pylist(), dtype=object)
    win = pairs["win"].to_numpy()
    weight = pairs["weight"].to_numpy().astype(np.float32)
    params, opt, sched = optimiser(backend, cfg)
    backend.train()
    losses = []
    for step in range(cfg.steps):
        idx = pair_indices(step, cfg.pairs_per_step, pairs.num_rows, cfg.seed)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for mb, lo in enumerate(range(0, len(idx), cfg.micro_batch)):
            sel = idx[lo : lo + cfg.micro_batch]
            ids = sample_ids[sel].tolist()
            gen = torch_generator(derive_seed(cfg.seed, "train", step, mb))
            batch = backend.make_noised_batch(
                images.candidates(ids, win[sel]), images.lr(ids), gen, t_range=cfg.timestep_range
            )
            err, _ = backend.prediction_errors(batch)
            loss = (torch.from_numpy(weight[sel]) * err).mean()
            (loss * (len(sel) / len(idx))).backward()
            total += float(loss.detach()) * len(sel) / len(idx)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        opt.step()
        sched.step()
        losses.append(total)
        if (step + 1) % cfg.log_every == 0:
            log(f"sft: step {step + 1}/{cfg.steps} denoising loss {total:.5f}")
    backend.eval()
    return {"steps": cfg.steps, "sft_loss_first": losses[0], "sft_loss_last": losses[-1]}


def loss_tail(metrics: pa.Table, fraction: float = 0.1) -> tuple[float, float]:
    """Mean DPO loss and implicit accuracy over the last `fraction` of the steps (at least one step)."""
    k = max(1, int(round(fraction * metrics.num_rows)))
    tail = metrics.slice(metrics.num_rows - k)
    return float(np.mean(tail["loss"])), float(np.mean(tail["implicit_acc"]))


def _minus(a, b) -> np.ndarray:
    """a − b of two pyarrow columns, as float64."""
    return np.asarray(a.to_numpy(), dtype=np.float64) - np.asarray(b.to_numpy(), dtype=np.float64)


def train_arm(proto: dict, model_dir: str, arm: str, seed: int, data: dict, rewards: dict, log) -> tuple:
    """Fine-tune a fresh copy of the base model as arm `arm` with training seed `seed` → (backend, record)."""
    import tempfile

    from dp2o.storage import Storage
    from dp2o.train.loop import train_dpo

    pairs = arm_pairs(proto, arm, seed, rewards)
    backend = load_base(proto, model_dir)
    cfg = train_config(proto, seed)
    images = MemoryImages(data["train_ids"], data["train_cands"], data["train_lr"])
    record = {
        "arm": arm,
        "seed": seed,
        "pairs": pairs.num_rows,
        "pair_visits_per_pair": cfg.steps * cfg.pairs_per_step / pairs.num_rows,
    }
    if ARM_RECIPES[arm][1] == "sft":
        record.update(train_sft(backend, pairs, images, cfg, log))
        return backend, record
    with tempfile.TemporaryDirectory() as tmp:
        result = train_dpo(backend, pairs, images, cfg, Storage(tmp), log=log)
    loss, acc = loss_tail(result.metrics)
    m = result.metrics
    record.update(
        loss_first=float(m["loss"][0].as_py()),
        loss_last10pct=loss,
        implicit_acc_last10pct=acc,
        loss_curve=[float(x) for x in m["loss"].to_numpy()],
        # how the policy's denoising error moved against the frozen reference's on winners and on losers, per
        # step: DPO's loss falls whenever the loser's rises more than the winner's, even if both rise
        err_w_minus_ref=[float(x) for x in _minus(m["err_w"], m["err_ref_w"])],
        err_l_minus_ref=[float(x) for x in _minus(m["err_l"], m["err_ref_l"])],
    )
    return backend, record


# ---- evaluation -------------------------------------------------------------------------------------------------
def evaluate(proto: dict, backend: TinyBackend, data: dict, scorer: RewardModel) -> pa.Table:
    """M_eval candidates per held-out crop (seeds fixed by the protocol), every metric, and the frozen-bounds
    hybrid reward (`reward`); one row per candidate with its photo."""
    ids = data["eval_ids"]
    cands = sample_candidates(
        backend,
        ids,
        data["eval_lr"],
        proto["m_eval"],
        0,
        16,
        seed_of=lambda sid, c: candidate_seed(proto["data_seed"], "mini-controls-eval", sid, c),
    )
    raw = scorer.raw(ids, cands, data["eval_hr"])
    table = data["hybrid"].reward(raw.select(["sample_id", "candidate", *data["hybrid"].metric_names]))
    for name in raw.column_names:
        if name not in table.column_names:
            table = table.append_column(name, raw[name])
    photo = [data["eval_photo"][s] for s in table["sample_id"].to_pylist()]
    return table.append_column("photo", pa.array(photo))


# ---- the shared inputs ------------------------------------------------------------------------------------------
def prepare(
    proto: dict, model_dir: str, train_names: list[str], eval_names: list[str], eval_stage: str
) -> dict:
    """Crops, the base model's training candidates, and the three training rewards (hybrid with bounds fitted
    here and frozen for evaluation; fidelity alone; realism alone)."""
    crop, seed = proto["crop"], proto["data_seed"]
    train_ids, train_hr, train_lr, train_photo = photo_crops(
        train_names, proto["train_crops_per_photo"], crop, seed, "mini-controls-train"
    )
    eval_ids, eval_hr, eval_lr, eval_photo = photo_crops(
        eval_names, proto["eval_crops_per_photo"], crop, seed, eval_stage
    )
    base = load_base(proto, model_dir)
    cands = sample_candidates(
        base,
        train_ids,
        train_lr,
        proto["m"],
        0,
        16,
        seed_of=lambda sid, c: candidate_seed(seed, "mini-controls-train", sid, c),
    )
    hybrid = RewardModel(proto["reward_metrics"], RewardConfig())
    scorer = RewardModel(",".join(eval_metric_names(proto)), RewardConfig())
    raw = scorer.raw(train_ids, cands, train_hr)
    rewards = {"hybrid": hybrid.reward(raw.select(["sample_id", "candidate", *hybrid.metric_names]))}
    for key in ("fidelity", "realism"):
        single = RewardModel(proto[f"{key}_metric"], RewardConfig())
        rewards[key] = single.reward(raw.select(["sample_id", "candidate", proto[f"{key}_metric"]]))
    data = dict(
        train_ids=train_ids,
        train_lr=train_lr,
        train_cands=cands,
        train_photo=train_photo,
        eval_ids=eval_ids,
        eval_hr=eval_hr,
        eval_lr=eval_lr,
        eval_photo=eval_photo,
        hybrid_bounds=hybrid.bounds,
    )
    return {"data": data, "rewards": rewards}


_WORKER: dict = {}


def _init_worker(proto: dict, model_dir: str, shared: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    if multiprocessing.parent_process() is not None:
        _exit_with_parent()
    data = dict(shared["data"])
    hybrid = RewardModel(proto["reward_metrics"], RewardConfig())
    hybrid.bounds = data["hybrid_bounds"]
    data["hybrid"] = hybrid
    scorer = RewardModel(",".join(eval_metric_names(proto)), RewardConfig())
    _WORKER.update(proto=proto, model_dir=model_dir, data=data, rewards=shared["rewards"], scorer=scorer)


def _run(arm: str, seed: int) -> tuple[pa.Table, dict]:
    w = _WORKER
    t = time.time()
    prefix = f"   [{arm} seed {seed}]"
    backend, record = train_arm(
        w["proto"], w["model_dir"], arm, seed, w["data"], w["rewards"], lambda s: print(prefix, s, flush=True)
    )
    record["train_s"] = time.time() - t
    t = time.time()
    table = evaluate(w["proto"], backend, w["data"], w["scorer"])
    record["eval_s"] = time.time() - t
    return table, record


def _base_eval() -> pa.Table:
    w = _WORKER
    return evaluate(w["proto"], load_base(w["proto"], w["model_dir"]), w["data"], w["scorer"])


def write_atomic_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_atomic_json(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def run_all(proto: dict, jobs: list[tuple[str, int]], shared: dict, model_dir: str, work: Path, n_jobs: int):
    """Base evaluation, then every (arm, seed) job not yet finished under `work`; each finished run is written
    (record, then scores renamed into place last) as soon as it ends."""
    work.mkdir(parents=True, exist_ok=True)
    _init_worker(proto, model_dir, shared, max(1, n_jobs))
    if not (work / "base.parquet").exists():
        write_atomic_table(_base_eval(), work / "base.parquet")
    todo = [(a, s) for a, s in jobs if not (work / f"{a}-s{s}.parquet").exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already finished under {work}", flush=True)

    def finished(arm, seed, table, record):
        write_atomic_json(record, work / f"{arm}-s{seed}.json")
        write_atomic_table(table, work / f"{arm}-s{seed}.parquet")
        print(
            f"== {arm} seed {seed}: held-out mean reward {np.mean(table['reward']):.4f} "
            f"(train {record['train_s']:.0f}s, eval {record['eval_s']:.0f}s)",
            flush=True,
        )

    if n_jobs <= 1 or len(todo) <= 1:
        torch.set_num_threads(1)
        for arm, seed in todo:
            finished(arm, seed, *_run(arm, seed))
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(
        max_workers=min(n_jobs, len(todo)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(proto, model_dir, shared, 1),
    ) as pool:
        futures = {pool.submit(_run, arm, seed): (arm, seed) for arm, seed in todo}
        for future in as_completed(futures):
            finished(*futures[future], *future.result())


# ---- statistics -------------------------------------------------------------------------------------------------
def per_photo_seed(runs: pa.Table, base: pa.Table, column: str) -> tuple[list[str], list[int], np.ndarray]:
    """Arm − base of the mean of `column` per (photo, seed): matrix [photos, seeds] for one arm's rows."""
    photos = sorted(set(base["photo"].to_pylist()))
    seeds = sorted(set(runs["seed"].to_pylist()))
    base_df = base.select(["photo", column]).to_pandas().groupby("photo")[column].mean()
    df = runs.select(["photo", "seed", column]).to_pandas().groupby(["photo", "seed"])[column].mean()
    matrix = np.array([[df[(p, s)] - base_df[p] for s in seeds] for p in photos])
    return photos, seeds, matrix


def bootstrap_photo_seed(matrix: np.ndarray, draws: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the grand mean when photos (rows) and seeds (columns) are both resampled
    with replacement."""
    rng = np.random.default_rng(seed)
    p, s = matrix.shape
    means = np.empty(draws)
    for b in range(draws):
        rows = rng.integers(0, p, p)
        cols = rng.integers(0, s, s)
        means[b] = matrix[np.ix_(rows, cols)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def effect(matrix: np.ndarray, draws: int, seed: int) -> dict:
    """The statistic of one arm and column: mean over photos of the per-photo mean over seeds, with the
    t-interval over photos and the photo × seed bootstrap interval."""
    mean, lo, hi = t_interval(matrix.mean(axis=1))
    b_lo, b_hi = bootstrap_photo_seed(matrix, draws, seed) if matrix.size > 1 else (float("nan"),) * 2
    return {
        "mean": mean,
        "t_lo": lo,
        "t_hi": hi,
        "boot_lo": b_lo,
        "boot_hi": b_hi,
        "photos": matrix.shape[0],
        "seeds": matrix.shape[1],
        "photo_sd": float(matrix.mean(axis=1).std(ddof=1)) if matrix.shape[0] > 1 else float("nan"),
        "per_photo": [float(x) for x in matrix.mean(axis=1)],
    }


def minimum_detectable_effect(photo_sd: float, photos: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true mean difference a two-sided one-sample t-test over `photos` photos detects with `power`,
    for photos whose per-photo effects have standard deviation `photo_sd` (normal approximation of the
    noncentral t with t quantiles: (t_{1-α/2} + t_{power}) · sd / √photos)."""
    from scipy import stats

    df = photos - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * photo_sd / np.sqrt(photos))


def collect(work: Path) -> tuple[pa.Table, pa.Table, list[dict]]:
    """(base rows, every finished run's rows with `arm` and `seed`, their training records)."""
    base = pq.read_table(work / "base.parquet")
    tables, records = [], []
    for f in sorted(work.glob("*-s*.parquet")):
        record = json.loads(f.with_suffix(".json").read_text())
        t = pq.read_table(f)
        n = t.num_rows
        t = t.append_column("arm", pa.array([record["arm"]] * n)).append_column(
            "seed", pa.array([record["seed"]] * n, pa.int64())
        )
        tables.append(t)
        records.append(record)
    return base, (pa.concat_tables(tables) if tables else None), records


def analyse(proto: dict, work: Path) -> dict:
    """Every arm's effect on the hybrid reward, the fidelity metric and the realism metric, the paired
    dp2o − shuffled contrast, and the training records' loss tails."""
    import pyarrow.compute as pc

    base, runs, records = collect(work)
    columns = ["reward", proto["fidelity_metric"], proto["realism_metric"]]
    out: dict = {"effects": {}, "contrasts": {}, "training": {}}
    if runs is None:
        return out
    draws, bseed = proto["bootstrap"]["draws"], proto["bootstrap"]["seed"]
    matrices = {}
    for arm in proto["arms"]:
        rows = runs.filter(pc.equal(runs["arm"], arm))
        if not rows.num_rows:
            continue
        out["effects"][arm] = {}
        for col in columns:
            photos, seeds, m = per_photo_seed(rows, base, col)
            matrices[(arm, col)] = (seeds, m)
            out["effects"][arm][col] = effect(m, draws, bseed)
        recs = [r for r in records if r["arm"] == arm]
        train = {
            "runs": len(recs),
            "train_s": float(np.sum([r["train_s"] for r in recs])),
            "eval_s": float(np.sum([r["eval_s"] for r in recs])),
        }
        if recs and "loss_last10pct" in recs[0]:
            train.update(
                loss_last10pct=float(np.mean([r["loss_last10pct"] for r in recs])),
                implicit_acc_last10pct=float(np.mean([r["implicit_acc_last10pct"] for r in recs])),
                loss_first=float(np.mean([r["loss_first"] for r in recs])),
                pair_visits_per_pair=recs[0]["pair_visits_per_pair"],
                pairs=recs[0]["pairs"],
            )
        out["training"][arm] = train
    for a, b in (("dp2o", "shuffled"), ("dp2o", "sft-winners")):
        for col in columns:
            if (a, col) in matrices and (b, col) in matrices:
                sa, ma = matrices[(a, col)]
                sb, mb = matrices[(b, col)]
                common = sorted(set(sa) & set(sb))
                d = ma[:, [sa.index(s) for s in common]] - mb[:, [sb.index(s) for s in common]]
                out["contrasts"].setdefault(f"{a} − {b}", {})[col] = effect(d, draws, bseed)
    out["base"] = {col: float(np.mean(base[col])) for col in columns}
    return out


# ---- report -----------------------------------------------------------------------------------------------------
UNITS = {"reward": "reward units (0–1)", "psnr": "dB", "entropy": "bits", "niqe": "", "brisque": ""}


def fmt(e: dict, digits: int) -> str:
    f = f"{{:+.{digits}f}}"
    return (
        f"{f.format(e['mean'])} [{f.format(e['t_lo'])}, {f.format(e['t_hi'])}] "
        f"(boot [{f.format(e['boot_lo'])}, {f.format(e['boot_hi'])}])"
    )


def verdict(e: dict) -> str:
    if not np.isfinite(e["t_lo"]):
        return "too few photos"
    if e["t_lo"] > 0 and e["boot_lo"] > 0:
        return "up"
    if e["t_hi"] < 0 and e["boot_hi"] < 0:
        return "down"
    return "no detectable change"


def report_tables(proto: dict, result: dict) -> str:
    fid, real = proto["fidelity_metric"], proto["realism_metric"]
    lines = [
        f"| arm | seeds | Δ hybrid reward | Δ {fid} ({UNITS.get(fid, '')}) | Δ {real} ({UNITS.get(real, '')}) | "
        "DPO loss, last 10 % of steps | implicit acc., last 10 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, eff in result["effects"].items():
        tr = result["training"][arm]
        loss = f"{tr['loss_last10pct']:.3f}" if "loss_last10pct" in tr else "— (SFT)"
        acc = f"{tr['implicit_acc_last10pct']:.2f}" if "implicit_acc_last10pct" in tr else "—"
        lines.append(
            f"| {arm} | {eff['reward']['seeds']} | {fmt(eff['reward'], 4)} | {fmt(eff[fid], 3)} | "
            f"{fmt(eff[real], 4)} | {loss} | {acc} |"
        )
    if result["contrasts"]:
        lines += [
            "",
            "| paired contrast (same training seeds) | seeds | Δ hybrid reward | Δ "
            + fid
            + " | Δ "
            + real
            + " |",
            "|---|---|---|---|---|",
        ]
        for name, eff in result["contrasts"].items():
            lines.append(
                f"| {name} | {eff['reward']['seeds']} | {fmt(eff['reward'], 4)} | {fmt(eff[fid], 3)} | {fmt(eff[real], 4)} |"
            )
    lines += ["", "| arm | Δ hybrid reward | Δ " + fid + " | Δ " + real + " |", "|---|---|---|---|"]
    for arm, eff in result["effects"].items():
        lines.append(f"| {arm} | {verdict(eff['reward'])} | {verdict(eff[fid])} | {verdict(eff[real])} |")
    return "\n".join(lines)


def plot_effects(proto: dict, result: dict, path: Path) -> None:
    """One panel per statistic (hybrid reward, fidelity metric, realism metric): per arm, the 10 photos' effects
    as dots and the mean with its t-interval over photos as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["reward", proto["fidelity_metric"], proto["realism_metric"]]
    arms = list(result["effects"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, col in zip(axes, columns, strict=True):
        for i, arm in enumerate(arms):
            e = result["effects"][arm][col]
            ax.scatter([i] * len(e["per_photo"]), e["per_photo"], s=12, color="#99a", zorder=2)
            ax.errorbar(
                [i],
                [e["mean"]],
                yerr=[[e["mean"] - e["t_lo"]], [e["t_hi"] - e["mean"]]],
                fmt="o",
                color="#c44e52",
                capsize=4,
                zorder=3,
            )
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_title(f"Δ {col} vs base ({UNITS.get(col, '')})", fontsize=10)
    fig.suptitle(
        "held-out photos: per-photo effect (dots), mean and 95 % t-interval over photos (red)", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", type=Path, default=PROTOCOL, help="the protocol file (every parameter)")
    p.add_argument("--pilot", action="store_true", help="the pilot: training photos only (see the protocol)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=JSON",
        help="pilot only: override protocol fields (e.g. learning_rate=1e-4); the pilot's folder and JSON are "
        "named after the overrides",
    )
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="runs in parallel")
    p.add_argument(
        "--model", default=None, help="tiny-sr folder of the base model (default: bundled weights)"
    )
    p.add_argument("--work-dir", type=Path, default=Path("runs/mini_controls"), help="finished runs (resume)")
    p.add_argument("--out", type=Path, default=Path("docs/mini_controls/results.json"), help="analysis JSON")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    proto = load_protocol(args.protocol)
    model_dir = args.model or str(bundled_weights_dir())
    if args.pilot:
        pilot = proto["pilot"]
        train_names, eval_names = pilot["train_photos"], pilot["eval_photos"]
        if set(eval_names) - set(proto["train_photos"]) or set(train_names) - set(proto["train_photos"]):
            raise SystemExit("the pilot may use training photos only")
        sets = dict(item.split("=", 1) for item in args.set)
        try:
            sets = {k: json.loads(v) for k, v in sets.items()}
        except json.JSONDecodeError as e:
            raise SystemExit(f"--set takes KEY=JSON items: {e}") from None
        unknown = sorted(set(sets) - set(REQUIRED))
        if unknown:
            raise SystemExit(f"--set: unknown protocol fields {unknown}")
        proto = {
            **proto,
            **pilot.get("overrides", {}),
            "arms": pilot["arms"],
            "seeds": pilot["seeds"],
            **sets,
        }
        tag = "-".join(f"{k}={v}" for k, v in sorted(sets.items())).replace("/", "_") or "protocol"
        work = args.work_dir / "pilot" / tag
        out = args.out.with_name(f"pilot-{tag}.json")
        stage = "mini-controls-pilot-eval"
    else:
        if args.set:
            raise SystemExit(
                "--set is for the pilot only: the main run takes every parameter from the protocol"
            )
        train_names, eval_names = proto["train_photos"], proto["heldout_photos"]
        work, out, stage = args.work_dir / "main", args.out, "mini-controls-eval"
    jobs = [(arm, s) for s in proto["seeds"] for arm in proto["arms"]]
    t0 = time.time()
    if not args.report_only:
        torch.set_num_threads(max(1, args.jobs))
        shared = prepare(proto, model_dir, train_names, eval_names, stage)
        print(f"prepared in {time.time() - t0:.0f}s", flush=True)
        run_all(proto, jobs, shared, model_dir, work, args.jobs)
    result = analyse(proto, work)
    result["protocol_sha256_16"] = protocol_hash(args.protocol)
    result["settings"] = {k: v for k, v in proto.items() if k != "pilot"}
    result["pilot"] = bool(args.pilot)
    result["wall_s_this_invocation"] = time.time() - t0
    if args.pilot and "dp2o" in result["effects"]:
        sd = result["effects"]["dp2o"]["reward"]["photo_sd"]
        result["mde_80pct"] = {
            col: minimum_detectable_effect(
                result["effects"]["dp2o"][col]["photo_sd"], len(proto["heldout_photos"])
            )
            for col in result["effects"]["dp2o"]
        }
        result["mde_note"] = f"photo sd of dp2o's reward effect in the pilot {sd:.5f}"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_json(result, out)
    if result["effects"]:
        print(report_tables(proto, result))
        if not args.pilot:
            plot_effects(proto, result, out.with_name("effects.png"))
            out.with_name("results.md").write_text(
                "# Controlled miniature: generated tables\n\n"
                f"Written by `python -m scripts.mini_controls` from the runs in `{work}` (protocol file hash "
                f"{result['protocol_sha256_16']}); the protocol and the discussion are in docs/mini_controls.md.\n"
                "Per arm: held-out Mean@M − base, mean over photos of the per-photo mean over seeds, [95 % "
                "t-interval over photos] (boot [95 % photo × seed bootstrap]).\n\n"
                + report_tables(proto, result)
                + "\n"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
