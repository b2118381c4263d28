"""Data-parallel training (`train.num_processes`): 2 gloo processes give the weights of 1, resume after SIGKILL,
and only rank 0 writes. Training runs on in-memory images with the tiny test model, so the time goes to
starting processes (each imports torch and diffusers, ~10 s on 2 cores), not to training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from dp2o.config import TrainConfig, canonical
from dp2o.errors import StageError
from dp2o.models import BackendConfig
from dp2o.storage import Storage
from dp2o.train.distributed import TrainJob, process_devices, run_training
from tests.helpers import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
#: 4 pairs per step. In micro-batches of 2, each of 2 processes has one, and the all-reduce adds g0 + g1 as one
#: process does. In micro-batches of 1, each process accumulates two, and the sum is ordered differently from
#: one process's: (g0 + g1) + (g2 + g3) against ((g0 + g1) + g2) + g3.
CFG = {
    "steps": 3,
    "pairs_per_step": 4,
    "learning_rate": 1e-4,
    "checkpoint_every": 1,
    "keep_last": 5,
    "log_every": 1,
}
PAIRS = pa.table(
    {
        "sample_id": [f"s{i}" for i in range(6)],
        "win": [0, 1, 2, 3, 0, 1],
        "lose": [4, 5, 6, 7, 5, 4],
        "weight": [1.0, 0.5, 2.0, 1.0, 0.25, 1.5],
    }
)
TOLERANCE = 1e-5


class MemoryImages:
    """Deterministic images of (sample_id, candidate): LR 8×8, candidates 32×32 (picklable, for the workers).
    delay: seconds every `lr` call sleeps, so a kill can land between two checkpoints."""

    def __init__(self, cache_dir=None, delay: float = 0.0):
        self.delay = delay

    @staticmethod
    def _image(key: str, size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(ord(c) * 31**i for i, c in enumerate(key)) % (2**31))
        return torch.rand(3, size, size, generator=g)

    def candidates(self, sample_ids, candidate_ids) -> torch.Tensor:
        return torch.stack(
            [self._image(f"{s}/{int(c)}", 32) for s, c in zip(sample_ids, candidate_ids, strict=True)]
        )

    def lr(self, sample_ids) -> torch.Tensor:
        time.sleep(self.delay)
        return torch.stack([self._image(f"{s}/lr", 8) for s in sample_ids])


class RecordingStorage(Storage):
    """A local stage folder that appends `rank op path` to a log file for every write (any process)."""

    def __init__(self, url: str, record: str):
        super().__init__(url)
        self.record = record

    def _note(self, op: str, *parts: str) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else -1
        with open(self.record, "a") as f:
            f.write(f"{rank} {op} {'/'.join(parts)}\n")

    def put_atomic(self, local_file, *parts: str) -> None:
        self._note("put", *parts)
        super().put_atomic(local_file, *parts)

    def rm(self, *parts: str, recursive: bool = False) -> None:
        self._note("rm", *parts)
        super().rm(*parts, recursive=recursive)

    def local_tmpdir(self):
        self._note("tmpdir")
        return super().local_tmpdir()


def job(out: Storage, num_processes: int, micro_batch: int, delay: float = 0.0) -> TrainJob:
    return TrainJob(
        backend=BackendConfig(kind="tiny", model=str(tiny_model_dir()), device="cpu"),
        pairs=PAIRS,
        images=partial(MemoryImages, delay=delay),
        config=TrainConfig(**CFG, micro_batch=micro_batch, num_processes=num_processes),
        out=out,
    )


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model_dir.rglob("*.safetensors")) for k, v in load_file(f).items()}


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def train_in_subprocess(out: str, scratch: str, delay: str) -> None:
    """Entry point of the process the SIGKILL test kills (see `test_sigkill_...`)."""
    run_training(job(Storage(out), 2, 2, float(delay)), Path(scratch))


def train(base: Path, procs: int, micro_batch: int, record: Path | None = None):
    name = f"p{procs}-mb{micro_batch}"
    folder = Storage(str(base / name)) if record is None else RecordingStorage(str(base / name), str(record))
    t0 = time.perf_counter()
    trained = run_training(job(folder, procs, micro_batch), base / f"scratch-{name}")
    print(f"{procs} process(es), micro_batch {micro_batch}: {time.perf_counter() - t0:.1f}s")
    return trained


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 3 steps in micro-batches of 2 trained by 1 and by 2 processes, keyed by the process count; the
    2-process run writes through a write-recording folder."""
    base = tmp_path_factory.mktemp("ddp")
    record = base / "writes.log"
    return {"base": base, "record": record, 1: train(base, 1, 2), 2: train(base, 2, 2, record)}


METRICS = ("loss", "implicit_acc", "reward_margin", "err_w", "err_l", "weight", "grad_norm", "lr")


def test_two_processes_give_the_weights_and_metrics_of_one(runs):
    one, two = runs[1], runs[2]
    diff = max_abs_difference(weights(one.model_dir), weights(two.model_dir))
    print(f"micro-batches of 2: max |w_1proc - w_2proc| after 3 steps: {diff:.3g}")
    assert diff <= TOLERANCE
    start = weights(tiny_model_dir())
    assert max_abs_difference(start, weights(two.model_dir)) > 1e-4, "training must have moved the weights"
    for col in METRICS:  # grad_norm is taken before clipping: a wrong loss normalisation would show there
        a, b = one.result.metrics[col].to_pylist(), two.result.metrics[col].to_pylist()
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7), col
    assert one.result.metrics["step"].to_pylist() == two.result.metrics["step"].to_pylist() == [1, 2, 3]
    assert two.result.stats["steps"] == 3 and two.result.stats["resumed_from"] == 0


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    import shutil

    shutil.copytree(runs["base"] / "p2-mb2" / "checkpoints", tmp_path / "run" / "checkpoints")
    resumed = run_training(job(Storage(str(tmp_path / "run")), 1, 2), tmp_path / "scratch")
    assert resumed.result.stats["resumed_from"] == 2
    assert max_abs_difference(weights(runs[1].model_dir), weights(resumed.model_dir)) <= TOLERANCE


@pytest.mark.slow
def test_reordered_gradient_sums_differ_only_where_adam_divides_by_its_eps(tmp_path):
    """Two micro-batches per process: the step-1 gradient equals one process's up to float order (5e-7 of 8
    before clipping), and the weights agree except for a few elements whose clipped gradient is ~1e-9, below
    AdamW's eps = 1e-8: there the update is lr·g/eps, so a rounding-sized change of g (even of its sign) moves the
    weight by up to ~lr per step. Measured: 1.5e-5 after 3 steps, on 26 of 165k elements above 1e-6; one
    process that sums its micro-batch gradients in the 2-process order gives the same 1.4931e-5."""
    one, two = train(tmp_path, 1, 1), train(tmp_path, 2, 1)
    for col in METRICS:
        a, b = one.result.metrics[col].to_pylist(), two.result.metrics[col].to_pylist()
        assert b[0] == a[0], (
            f"{col}: step 1 starts from the same weights, so its forward passes are identical"
        )
        # later steps see weights ~1e-5 apart in a few elements; errors move by ulps, which β/2 = 2500 magnifies
        # in the margin, the loss and the gradient (measured: loss 1.8e-4, grad_norm 0.05 of ~250 at step 3)
        magnified = col in ("loss", "reward_margin", "grad_norm")
        assert b[1:] == pytest.approx(
            a[1:], rel=2e-3 if magnified else 1e-5, abs=1e-3 if magnified else 1e-6
        ), col
    w1, w2 = weights(one.model_dir), weights(two.model_dir)
    diff = max_abs_difference(w1, w2)
    print(f"micro-batches of 1: max |w_1proc - w_2proc| after 3 steps: {diff:.3g}")
    lr, steps = CFG["learning_rate"], CFG["steps"]
    assert diff <= 2 * lr * steps, "no more than sign flips of Adam steps"
    off = sum(int(((w1[k].double() - w2[k].double()).abs() > 1e-6).sum()) for k in w1)
    assert off <= 1e-3 * sum(v.numel() for v in w1.values()), off


def test_only_rank_zero_writes_and_checkpoints_are_complete(runs):
    records = [line.split(" ", 2) for line in runs["record"].read_text().splitlines()]
    ranks = {r[0] for r in records}
    assert ranks == {"0"}, f"writes from ranks {ranks}: {records}"
    puts = [r[2] for r in records if r[1] == "put"]
    assert len(puts) == len(set(puts)), "a checkpoint file was written twice"
    one_dir, two_dir = runs["base"] / "p1-mb2" / "checkpoints", runs["base"] / "p2-mb2" / "checkpoints"
    names = sorted(p.name for p in two_dir.iterdir())
    assert names == sorted(p.name for p in one_dir.iterdir()) == ["step-000001", "step-000002"]
    for name in names:
        files = sorted(
            p.relative_to(two_dir / name).as_posix() for p in (two_dir / name).rglob("*") if p.is_file()
        )
        expected = sorted(
            p.relative_to(one_dir / name).as_posix() for p in (one_dir / name).rglob("*") if p.is_file()
        )
        assert files == expected and "COMPLETE.json" in files
        assert not [f for f in files if ".tmp" in f]
    # the checkpoints of 2 processes hold the weights of 1 (and the final model was not written into the folder)
    diff = max_abs_difference(weights(one_dir / "step-000002"), weights(two_dir / "step-000002"))
    assert diff <= TOLERANCE
    assert not (runs["base"] / "p2-mb2" / "model").exists()


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_rerun_gives_the_uninterrupted_weights(runs, tmp_path):
    import psutil

    out, scratch = tmp_path / "killed", tmp_path / "scratch"
    code = "import sys, tests.test_train_ddp as t; t.train_in_subprocess(*sys.argv[1:])"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    # 0.3 s per micro-batch: a step takes >= 0.3 s, so the kill lands before the step-2 checkpoint
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), str(scratch), "0.3"], cwd=REPO, env=env)
    marker = out / "checkpoints" / "step-000001" / "COMPLETE.json"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, "the training process ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)  # the stage process only: its workers must follow it
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers outlived the killed stage process: {alive}"
    assert not (scratch / "stats.json").exists(), "the run finished before the kill"
    assert not (out / "checkpoints" / "step-000003").exists()

    resumed = run_training(job(Storage(str(out)), 2, 2), tmp_path / "scratch-rerun")
    assert resumed.result.stats["resumed_from"] >= 1
    diff = max_abs_difference(weights(runs[2].model_dir), weights(resumed.model_dir))
    print(f"max |w_uninterrupted - w_resumed|: {diff:.3g}")
    assert diff <= TOLERANCE
    assert resumed.result.metrics["step"].to_pylist() == [1, 2, 3]


def test_num_processes_is_runtime_and_needs_a_micro_batch_per_process():
    assert canonical(TrainConfig(num_processes=8)) == canonical(TrainConfig())
    with pytest.raises(ValueError, match=r"train\.num_processes=3.*train\.micro_batch to at most 1"):
        TrainConfig(pairs_per_step=4, micro_batch=2, num_processes=3)


@pytest.mark.parametrize(
    ("device", "fix"),
    [
        ("cuda:1", "sample.backend.device=cuda"),
        ("mps", "train.num_processes=1"),
    ],
)
def test_impossible_device_combinations_name_the_field_and_the_fix(device, fix):
    with pytest.raises(StageError, match=rf"train\.num_processes=2.*{fix}"):
        process_devices(BackendConfig(kind="tiny", device=device), 2)


def test_more_processes_than_gpus_is_refused_before_starting_any(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(StageError, match=r"train\.num_processes=2 needs 2 GPUs.*train\.num_processes=1"):
        process_devices(BackendConfig(kind="tiny", device="cuda"), 2)
    assert process_devices(BackendConfig(kind="tiny", device="cpu"), 2) == ("gloo", ["cpu", "cpu"])


@pytest.mark.slow
def test_train_stage_with_two_processes_commits_the_model_of_one(tmp_path):
    """The stage body end to end: pairs from a real tiny pipeline, the backend rebuilt in each process from the
    plan's backend config, rank 0's model and metrics committed as the stage's one shard."""
    from dp2o import registry
    from dp2o.driver import run_pipeline, run_stage
    from tests.helpers import make_hr_folder, tiny_pipeline_config

    hr = make_hr_folder(tmp_path / "hr", n=2, size=96)
    cfg = tiny_pipeline_config(str(tmp_path / "runs"), str(hr), train={"micro_batch": 2})
    pairs = run_pipeline(cfg, until="pairs")["pairs"]
    assert pairs.manifest["rows"] >= 2
    stage = registry.get("train")
    results = {}
    for n in (1, 2):
        plan = stage.plan(
            cfg.train.model_copy(update={"num_processes": n}),
            {"pairs": pairs.url},
            out=str(tmp_path / f"train-{n}"),
            runtime=stage.runtime_of(cfg),
        )
        results[n] = run_stage(plan)
    one, two = (tmp_path / "train-1", tmp_path / "train-2")
    diff = max_abs_difference(weights(one / "model"), weights(two / "model"))
    print(f"train stage: max |w_1proc - w_2proc|: {diff:.3g}")
    assert diff <= TOLERANCE
    assert results[2].manifest["rows"] == results[1].manifest["rows"] == 3
    assert results[2].manifest["stats"]["final_loss"] == pytest.approx(
        results[1].manifest["stats"]["final_loss"]
    )
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
