"""The miniature reproduction script end to end at toy size: splits, the run pool, the report and the merge."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mini_repro():
    # imported by name from a folder on sys.path, so that the run pool's spawned workers can import it too
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        yield importlib.import_module("mini_repro")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The script sets torch's process-wide thread count; later tests must run with the default again."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TOY = [
    "--preset", "smoke", "--train-inputs", "2", "--eval-inputs", "2", "--m", "4", "--m-eval", "2",
    "--seeds", "2", "--steps", "1", "--pairs-per-step", "2", "--micro-batch", "2", "--crop", "32",
    "--num-inference-steps", "2",
]  # fmt: skip


@pytest.mark.parametrize("split", ["photo-val", "heldout"])
def test_tuning_and_heldout_splits_never_evaluate_on_a_training_photo(mini_repro, split):
    from dp2o.degrade.ingest import list_sources

    train_keep, eval_uri, _, eval_keep = mini_repro.split_sources(split)

    def photos(uri, keep):
        return {Path(r.relpath).name for r in list_sources(uri) if keep is None or keep(Path(r.relpath).name)}

    train, evaluated = photos("bundled://train", train_keep), photos(eval_uri, eval_keep)
    assert train and evaluated and not train & evaluated
    if split == "photo-val":
        assert evaluated == set(mini_repro.VAL_PHOTOS)
    ids, hr, lr = mini_repro.degraded_crops(eval_uri, 3, 32, 0, "v", eval_keep)
    assert hr.shape == (3, 3, 32, 32) and lr.shape == (3, 3, 8, 8) and len(set(ids)) == 3


def test_metric_weights_are_parsed_and_bad_ones_rejected(mini_repro):
    args = mini_repro.parse_args([*TOY, "--metric-weights", "piqe=0", "psnr=2"])
    assert args.metric_weights == {"piqe": 0.0, "psnr": 2.0}
    with pytest.raises(SystemExit):
        mini_repro.parse_args([*TOY, "--metric-weights", "piqe"])


def _toy_run(mini_repro, folder: Path, jobs: str) -> dict:
    out, plots = folder / "report.md", folder / "plots"
    mini_repro.main(
        [
            *TOY,
            "--only",
            "dp2o-multi-uniform",
            "--jobs",
            jobs,
            "--work-dir",
            str(folder / "work"),
            "--out",
            str(out),
            "--plot-dir",
            str(plots),
        ]  # fmt: skip
    )
    text = out.read_text()
    assert "| dp2o-multi-uniform | 2 |" in text and "## Verdicts" in text
    assert (plots / "at_m.png").stat().st_size > 0
    return json.loads((plots / "results.json").read_text())


def test_toy_run_writes_report_and_the_run_pool_matches_in_process_runs(mini_repro, tmp_path):
    alone = _toy_run(mini_repro, tmp_path / "one", "1")
    pooled = _toy_run(mini_repro, tmp_path / "two", "2")
    for record in (alone, pooled):
        assert [(r["method"], r["train_seed"]) for r in record["runs"]] == [
            ("dp2o-multi-uniform", 0),
            ("dp2o-multi-uniform", 1),
        ]
    # the same runs from the same seeds, whether trained in this process or in the pool
    assert [r["eval_mean"] for r in alone["runs"]] == pytest.approx(
        [r["eval_mean"] for r in pooled["runs"]], abs=1e-4
    )
