"""The evaluate stage: base vs tuned on a degrade stage or a user's folder, caching, and its refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dp2o import registry
from dp2o.driver import run_pipeline, run_stage
from dp2o.errors import StageError
from dp2o.evaluate import at_m_summary, evaluation_seed
from dp2o.evaluate.stage import summarize
from dp2o.reward import METRICS, PRESETS
from tests.helpers import make_hr_folder, tiny_pipeline_config

OFFLINE_FR = {n for n in PRESETS["offline"] if METRICS[n].kind == "FR"}
OFFLINE_NR = {n for n in PRESETS["offline"] if METRICS[n].kind == "NR"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pipeline run up to train, plus a separate held-out degrade stage (2 photos x 2 crops)."""
    base = tmp_path_factory.mktemp("eval")
    cfg = tiny_pipeline_config(
        str(base / "run"),
        str(make_hr_folder(base / "hr", n=2)),
        evaluate={"num_candidates": 2, "batch_size": 8},
    )
    results = run_pipeline(cfg, until="train")
    held_hr = base / "heldout_hr"
    held_hr.mkdir()
    for i, p in enumerate(sorted((base / "hr").rglob("*.*"))):  # the training photos, flipped: other images
        img = np.asarray(Image.open(p).convert("RGB"))
        Image.fromarray(np.ascontiguousarray(img[::-1, ::-1])).save(held_hr / f"held_{i}.png")
    degrade = registry.get("degrade")
    held = run_stage(degrade.plan(cfg.degrade, {"source": str(held_hr)}, root=str(base / "held")))
    return cfg, results, held.url, base


def evaluate(cfg, heldout: str, model: str | None = None, out: str | None = None):
    stage = registry.get("evaluate")
    plan = stage.plan(
        cfg.evaluate,
        {"model": model, "heldout": heldout},
        out,
        root=cfg.root,
        storage_options={},
        runtime=stage.runtime_of(cfg),
    )
    return run_stage(plan)


def save_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(img)).save(path)


def lr_images(n: int, size: int = 24, seed: int = 0) -> list[np.ndarray]:
    """Smooth random RGB images (a noise field upsampled), so NR metrics have something to measure."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC)))
    return out


def test_degrade_heldout_base_and_tuned(trained):
    cfg, results, heldout, _ = trained
    r = evaluate(cfg, heldout, model=results["train"].url)
    assert r.computed == 1
    out = Path(r.url)
    cands = pq.read_table(out / "data" / "candidates.parquet")
    assert {"model", "sample_id", "source", "candidate", "seed", "reward"} | OFFLINE_FR | OFFLINE_NR <= set(
        cands.column_names
    )
    assert cands.num_rows == 2 * 4 * cfg.evaluate.num_candidates  # 2 models x 4 inputs x M
    rows = cands.to_pylist()
    base = {(x["sample_id"], x["candidate"]): x for x in rows if x["model"] == "base"}
    tuned = {(x["sample_id"], x["candidate"]): x for x in rows if x["model"] == "tuned"}
    assert base.keys() == tuned.keys()
    for key, b in base.items():
        assert b["seed"] == tuned[key]["seed"] == evaluation_seed(cfg.evaluate.seed, *key)
    assert len({b["seed"] for b in base.values()}) == len(base)
    # the tuned weights differ from the base ones, so its candidates (hence their scores) differ
    assert any(abs(b["psnr"] - tuned[k]["psnr"]) > 1e-9 for k, b in base.items())
    assert len({x["source"] for x in rows}) == 2
    r_all = cands["reward"].to_numpy()
    assert np.isfinite(r_all).all() and (r_all >= 0).all() and (r_all <= 1).all()

    summary = pq.read_table(out / "data" / "summary.parquet")
    reward = summary.filter(pc.equal(summary["statistic"], "reward")).to_pylist()
    assert {x["model"] for x in reward} == {"base", "tuned", "tuned-base"}
    assert {x["at_m"] for x in reward} == {"best", "mean", "worst"}
    assert all(x["inputs"] == 4 and x["sources"] == 2 for x in reward)
    assert all(math.isfinite(x["lo_by_source"]) for x in reward)  # two photos: an interval over photos
    diff = {x["at_m"]: x["value"] for x in reward if x["model"] == "tuned-base"}
    means = {(x["model"], x["at_m"]): x["value"] for x in reward}
    assert diff["mean"] == pytest.approx(means[("tuned", "mean")] - means[("base", "mean")])
    assert set(summary["statistic"].to_pylist()) == {"reward"} | OFFLINE_FR | OFFLINE_NR

    md = (out / "summary.md").read_text()
    assert "over 4 inputs" in md and "over 2 photos" in md and "tuned-base" in md
    st = r.manifest["stats"]
    assert st["inputs"] == 4 and st["sources"] == 2
    assert st["reward_mean_at_m_base"] == pytest.approx(means[("base", "mean")])
    assert "reward_mean_at_m_tuned" in st
    lines = summarize({**r.manifest, "url": r.url})
    assert "tuned" in lines[0] and "over 4 inputs" in lines[0]

    again = evaluate(cfg, heldout, model=results["train"].url)
    assert again.computed == 0 and again.skipped == 1 and again.url == r.url


def test_training_set_as_heldout_is_flagged(trained):
    cfg, results, _, _ = trained
    r = evaluate(cfg, results["degrade"].url, model=results["train"].url)
    assert (
        "WARNING: the held-out set is the degrade stage the model was trained on"
        in (Path(r.url) / "summary.md").read_text()
    )


def test_lr_only_folder_scores_nr_metrics_only(trained, tmp_path):
    cfg, _, _, _ = trained
    for i, img in enumerate(lr_images(3)):
        save_png(tmp_path / "lr_only" / f"img_{i}.png", img)
    r = evaluate(cfg, str(tmp_path / "lr_only"))  # no --model: the config's base model alone
    cands = pq.read_table(Path(r.url) / "data" / "candidates.parquet")
    assert not OFFLINE_FR & set(cands.column_names)
    assert set(cands.column_names) >= OFFLINE_NR
    assert set(cands["model"].to_pylist()) == {"base"}
    assert set(cands["source"].to_pylist()) == {"img_0", "img_1", "img_2"}
    assert np.isfinite(cands["reward"].to_numpy()).all()
    summary = pq.read_table(Path(r.url) / "data" / "summary.parquet")
    assert set(summary["model"].to_pylist()) == {"base"}
    assert sorted(r.manifest["stats"]["fr_dropped"]) == sorted(OFFLINE_FR)
    md = (Path(r.url) / "summary.md").read_text()
    assert "dropped" in md and "over 3 inputs" in md


def test_lr_hr_folder_pairs_by_stem(trained, tmp_path):
    cfg, results, _, _ = trained
    lrs = lr_images(3, seed=1)
    root = tmp_path / "pairs"
    save_png(root / "lr" / "a.png", lrs[0])
    save_png(root / "lr" / "b_x4.png", lrs[1])  # pairs with hr/b.png (scale tag dropped)
    save_png(root / "lr" / "c.png", lrs[2])  # no HR
    hr_a = np.asarray(Image.fromarray(lrs[0]).resize((96, 96), Image.BICUBIC))
    hr_b = np.asarray(Image.fromarray(lrs[1]).resize((99, 98), Image.BICUBIC))  # floor(HR / 4) == LR: cropped
    save_png(root / "hr" / "a.png", hr_a)
    save_png(root / "hr" / "b.png", hr_b)
    r = evaluate(cfg, str(root), model=results["train"].url)
    cands = pq.read_table(Path(r.url) / "data" / "candidates.parquet")
    assert set(cands.column_names) >= OFFLINE_FR | OFFLINE_NR
    by_id = {}
    for x in cands.to_pylist():
        by_id.setdefault(x["sample_id"], []).append(x)
    assert set(by_id) == {"a", "b_x4", "c"}
    for sid, xs in by_id.items():
        assert all(x["has_hr"] == (sid != "c") for x in xs)
        assert all(math.isfinite(x["psnr"]) == (sid != "c") for x in xs)
        assert all(math.isfinite(x["entropy"]) and math.isfinite(x["reward"]) for x in xs)
    summary = pq.read_table(Path(r.url) / "data" / "summary.parquet").to_pylist()
    psnr = [x for x in summary if x["statistic"] == "psnr" and x["model"] == "base"]
    assert psnr and all(x["inputs"] == 2 for x in psnr)  # FR statistics over the inputs with HR only
    assert all(x["inputs"] == 3 for x in summary if x["statistic"] == "reward")
    assert "1 of 3 inputs have no HR" in (Path(r.url) / "summary.md").read_text()


def test_at_m_summary_direction_and_pairing():
    rows = []
    for model, shift in (("base", 0.0), ("tuned", 1.0)):
        for sid, src in (("i0", "p0"), ("i1", "p0"), ("i2", "p1")):
            for v in (1.0, 3.0):
                rows.append(
                    {"model": model, "sample_id": sid, "source": src, "loss": v + shift, "score": v + shift}
                )
    table = pa.Table.from_pylist(rows)
    s = at_m_summary(table, {"loss": False, "score": True}).to_pylist()
    get = {(x["model"], x["statistic"], x["at_m"]): x for x in s}
    assert get[("base", "loss", "best")]["value"] == 1.0  # lower is better: best is the smallest
    assert get[("base", "score", "best")]["value"] == 3.0
    assert get[("tuned-base", "score", "mean")]["value"] == pytest.approx(1.0)
    assert get[("tuned-base", "score", "mean")]["lo"] == pytest.approx(1.0)  # identical differences
    assert get[("base", "score", "mean")]["sources"] == 2


def test_refusals(trained, tmp_path):
    cfg, results, heldout, _ = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no images here")
    with pytest.raises(StageError, match="holds no images"):
        evaluate(cfg, str(empty))
    with pytest.raises(StageError, match="does not exist"):
        evaluate(cfg, str(tmp_path / "nowhere"))
    with pytest.raises(StageError, match="not train"):
        evaluate(cfg, heldout, model=results["degrade"].url)
    with pytest.raises(StageError, match="not a finished train stage"):
        evaluate(cfg, heldout, model=str(empty))
    with pytest.raises(StageError, match="finished sample stage"):
        evaluate(cfg, results["sample"].url)
    tiny = tmp_path / "tiny_lr"
    save_png(tiny / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(StageError, match=r"x\.png is 4x4, too small"):
        evaluate(cfg, str(tiny))
