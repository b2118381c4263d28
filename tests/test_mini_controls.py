"""The controlled miniature (scripts/mini_controls.py): its protocol checks, its controls, its statistics, and a
toy run that resumes without rerunning finished runs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from dp2o.data import BUNDLED_PHOTOS, bundled_files


@pytest.fixture(scope="module")
def mc():
    from scripts import mini_controls

    return mini_controls


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_protocol_splits_twenty_installed_photos_by_photo(mc):
    proto = mc.load_protocol(mc.PROTOCOL)
    train, held = set(proto["train_photos"]), set(proto["heldout_photos"])
    assert len(train) >= 5 and len(held) >= 5 and len(train | held) >= 10 and not train & held
    # the tiny model's own held-out photos stay held out, and the pilot only touches training photos
    assert set(BUNDLED_PHOTOS["heldout"]) <= held
    pilot = proto["pilot"]
    assert set(pilot["train_photos"]) | set(pilot["eval_photos"]) <= train
    assert not set(pilot["train_photos"]) & set(pilot["eval_photos"])


def test_the_extra_split_resolves_to_photos_inside_pyiqa(mc):
    from PIL import Image

    files = bundled_files("bundled://extra")
    assert [f.name for f in files] == list(BUNDLED_PHOTOS["extra"])
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "RGB" and min(im.size) >= 256


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.pop("steps"), "missing fields"),
        (lambda p: p.update(heldout_photos=[p["train_photos"][0]]), "in both"),
        (lambda p: p.update(n_top=5, m=8), "n_top"),
        (lambda p: p.update(arms=["dp2o", "magic"]), "unknown arms"),
        (lambda p: p.update(train_photos=["nope.png"]), "not installed"),
    ],
)
def test_a_bad_protocol_is_refused_with_the_reason(mc, tmp_path, change, message):
    proto = json.loads(mc.PROTOCOL.read_text())
    change(proto)
    path = tmp_path / "protocol.json"
    path.write_text(json.dumps(proto))
    with pytest.raises(SystemExit, match=message):
        mc.load_protocol(path)


def test_shuffled_labels_swap_about_half_the_pairs_and_depend_on_the_seed(mc):
    n = 2000
    pairs = pa.table(
        {
            "sample_id": [f"s{i // 4}" for i in range(n)],
            "win": np.zeros(n, np.int64),
            "lose": np.ones(n, np.int64),
            "weight": np.ones(n),
        }
    )
    a, b = mc.shuffle_labels(pairs, 0), mc.shuffle_labels(pairs, 1)
    swapped = a["win"].to_numpy() == 1
    assert 0.45 < swapped.mean() < 0.55
    assert np.array_equal(a["lose"].to_numpy(), 1 - a["win"].to_numpy())  # a swap, never a new candidate
    assert np.array_equal(mc.shuffle_labels(pairs, 0)["win"].to_numpy(), a["win"].to_numpy())
    assert not np.array_equal(b["win"].to_numpy(), a["win"].to_numpy())
    assert a.column_names == pairs.column_names


def test_t_interval_and_the_minimum_detectable_effect_match_textbook_values(mc):
    from scipy import stats

    x = np.array([1.0, 2.0, 3.0, 4.0])
    mean, lo, hi = mc.t_interval(x)
    half = stats.t.ppf(0.975, 3) * x.std(ddof=1) / 2
    assert mean == 2.5 and lo == pytest.approx(2.5 - half) and hi == pytest.approx(2.5 + half)
    # (t_.975 + t_.80) with 9 degrees of freedom is about 2.262 + 0.883
    assert mc.minimum_detectable_effect(1.0, 10) == pytest.approx((2.2622 + 0.8834) / np.sqrt(10), rel=1e-3)
    # more photos, smaller detectable effect
    assert mc.minimum_detectable_effect(1.0, 20) < mc.minimum_detectable_effect(1.0, 10)


def test_the_photo_seed_bootstrap_covers_the_mean_and_widens_with_photo_spread(mc):
    rng = np.random.default_rng(0)
    tight = 0.01 * rng.standard_normal((10, 5))
    spread = tight + rng.standard_normal((10, 1))  # photos differ a lot
    lo_t, hi_t = mc.bootstrap_photo_seed(tight, 2000, 0)
    lo_s, hi_s = mc.bootstrap_photo_seed(spread, 2000, 0)
    assert lo_t <= tight.mean() <= hi_t and lo_s <= spread.mean() <= hi_s
    assert hi_s - lo_s > 10 * (hi_t - lo_t)


def test_per_photo_seed_subtracts_the_base_models_photo_mean(mc):
    base = pa.table({"photo": ["a", "a", "b", "b"], "reward": [0.1, 0.3, 0.5, 0.5]})
    runs = pa.table(
        {
            "photo": ["a", "a", "b", "b", "a", "b"],
            "seed": [0, 0, 0, 0, 1, 1],
            "reward": [0.4, 0.4, 0.5, 0.7, 0.2, 0.5],
        }
    )
    photos, seeds, m = mc.per_photo_seed(runs, base, "reward")
    assert photos == ["a", "b"] and seeds == [0, 1]
    np.testing.assert_allclose(m, [[0.2, 0.0], [0.1, 0.0]], atol=1e-12)
    assert mc.verdict(mc.effect(m + 1.0, 100, 0)) == "up"
    assert mc.verdict(mc.effect(m - 1.0, 100, 0)) == "down"


TOY = {
    "crop": 32,
    "train_crops_per_photo": 1,
    "eval_crops_per_photo": 1,
    "m": 4,
    "n_top": 1,
    "m_eval": 2,
    "steps": 2,
    "pairs_per_step": 2,
    "micro_batch": 2,
    "warmup_steps": 0,
    "num_inference_steps": 2,
    "seeds": [0],
    "bootstrap": {"draws": 50, "seed": 0},
}


def test_a_toy_run_trains_every_arm_and_resumes_without_rerunning(mc, tmp_path, monkeypatch):
    proto = {**json.loads(mc.PROTOCOL.read_text()), **TOY}
    proto["train_photos"] = proto["train_photos"][:2]
    proto["heldout_photos"] = proto["heldout_photos"][:2]
    path = tmp_path / "protocol.json"
    path.write_text(json.dumps(proto))
    argv = [
        "--protocol",
        str(path),
        "--jobs",
        "1",
        "--work-dir",
        str(tmp_path / "w"),
        "--out",
        str(tmp_path / "r.json"),
    ]
    mc.main(argv)
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["effects"]) == set(proto["arms"])
    for eff in result["effects"].values():
        assert set(eff) == {"reward", "psnr", "entropy"}
        assert eff["reward"]["photos"] == 2 and eff["reward"]["seeds"] == 1
    assert (
        "loss_last10pct" in result["training"]["dp2o"]
        and "loss_last10pct" not in result["training"]["sft-winners"]
    )
    assert set(result["contrasts"]) == {"dp2o − shuffled", "dp2o − sft-winners"}
    finished = sorted(p.name for p in (tmp_path / "w" / "main").glob("*.parquet"))
    assert len(finished) == 1 + len(proto["arms"])

    # a rerun finds every run finished and trains nothing
    monkeypatch.setattr(mc, "_run", lambda *a: pytest.fail("a finished run was trained again"))
    mc.main(argv)
    assert json.loads((tmp_path / "r.json").read_text())["effects"] == result["effects"]


def test_sft_on_winners_lowers_the_denoising_loss_on_its_targets(mc):
    """The positive control trains: repeated steps on one winner lower its denoising error."""
    from dp2o.config import TrainConfig
    from dp2o.models.tiny import TinyBackend, bundled_weights_dir

    torch.manual_seed(0)
    backend = TinyBackend.from_pretrained(str(bundled_weights_dir()))
    lr = (torch.rand(1, 3, 8, 8) * 255).to(torch.uint8)
    cands = torch.rand(1, 2, 3, 32, 32)
    pairs = pa.table({"sample_id": ["s0"], "win": [0], "lose": [1], "weight": [1.0]})
    images = mc.MemoryImages(["s0"], cands, lr)
    cfg = TrainConfig(steps=25, pairs_per_step=4, micro_batch=4, learning_rate=1e-3, seed=0)
    record = mc.train_sft(backend, pairs, images, cfg, log=lambda s: None)
    assert record["sft_loss_last"] < 0.7 * record["sft_loss_first"]


def test_set_is_for_the_pilot_only(mc):
    with pytest.raises(SystemExit, match="pilot only"):
        mc.main(["--set", "steps=3", "--report-only"])
