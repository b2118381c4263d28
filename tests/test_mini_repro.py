"""The miniature reproduction script end to end at toy size: splits, the run pool, the report and the merge."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from dp2o.data import BUNDLED_PHOTOS


@pytest.fixture(scope="module")
def mini_repro():
    # the run pool's spawned workers import it by name (scripts.mini_repro): spawn gives them the parent's
    # import path, which holds the repository root
    from scripts import mini_repro

    return mini_repro


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
    # TOY's 2 held-out crops come one from each of the first two held-out photos (in name order) ...
    assert (
        "| china.jpg | dp2o-multi-uniform | 2 |" in text and "| coffee.png | dp2o-multi-uniform | 2 |" in text
    )
    # ... and the average over those two photos has its interval over photos
    assert "| method | photos | Best@M |" in text and "\n| dp2o-multi-uniform | 2 | " in text
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
    # a report rebuilt from one invocation's saved outputs has its numbers and names the command that ran it
    rebuilt = tmp_path / "rebuilt"
    mini_repro.main(
        [
            "--merge",
            str(tmp_path / "one" / "plots"),
            "--out",
            str(rebuilt / "r.md"),
            "--plot-dir",
            str(rebuilt),
        ]
    )
    again = json.loads((rebuilt / "results.json").read_text())
    assert again["summary"] == alone["summary"] and again["command"] == alone["command"]
    assert alone["command"].startswith("python -m scripts.mini_repro --preset smoke")
    assert "report rebuilt from its saved outputs" in (rebuilt / "r.md").read_text()


def test_methods_option_names_recipes_and_sets_m_to_the_largest(mini_repro):
    args = mini_repro.parse_args(["--methods", "16:1:uniform", "32:8:hpo"])
    assert [(m.name, m.m, m.n_top, m.weighting) for m in args.methods] == [
        ("m16-n1-uniform", 16, 1, "uniform"),
        ("m32-n8-hpo", 32, 8, "hpo"),
    ]
    assert args.m == 32 and mini_repro.all_methods(args) == args.methods
    for bad in (["--methods", "32:17:hpo"], ["--methods", "16:4:softmax"], ["--methods", "16-4-hpo"]):
        with pytest.raises(SystemExit):
            mini_repro.parse_args(bad)
    with pytest.raises(SystemExit):  # candidates of --m 8 cannot feed an M=16 recipe
        mini_repro.parse_args(["--m", "8", "--methods", "16:4:hpo"])
    # --only must name methods of the run (a typo used to sample every candidate, then fail in the report)
    assert mini_repro.parse_args(["--only", "dp2o-multi-hpo"]).only == ["dp2o-multi-hpo"]
    for bad in (
        ["--only", "dp2o-multi"],
        ["--only"],
        ["--methods", "16:1:uniform", "--only", "dp2o-multi-hpo"],
    ):
        with pytest.raises(SystemExit):
            mini_repro.parse_args(bad)


def test_photo_val_leaves_out_exactly_the_photos_asked_for(mini_repro):
    train_keep, uri, _, eval_keep = mini_repro.split_sources("photo-val", ("astronaut.png", "retina.jpg"))
    assert uri == "bundled://train"
    assert eval_keep("astronaut.png") and eval_keep("retina.jpg") and not eval_keep("chelsea.png")
    assert not train_keep("astronaut.png") and not train_keep("retina.jpg") and train_keep("chelsea.png")


@pytest.fixture(scope="module")
def mini_repro_cv(mini_repro):
    from scripts import mini_repro_cv

    return mini_repro_cv


def _evals(rows):
    """eval_rewards-like table: (method, train_seed, sample_id, reward) rows."""
    import pyarrow as pa

    method, seed, sample, reward = zip(*rows, strict=True)
    return pa.table(
        {"method": list(method), "train_seed": list(seed), "sample_id": list(sample), "reward": list(reward)}
    )


def test_cv_differences_are_per_seed_minus_base_then_averaged_over_folds(mini_repro_cv):
    import pyarrow as pa

    base = [("base", -1, "a", 0.5), ("base", -1, "a", 0.3), ("base", -1, "b", 0.4), ("base", -1, "b", 0.2)]
    fold1 = mini_repro_cv.fold_differences(
        _evals(
            [*base, *[("x", 0, s, r + 0.1) for _, _, s, r in base], *[("x", 1, s, r) for _, _, s, r in base]]
        ),
        "f1",
    )
    got = {(r["method"], r["train_seed"]): r for r in fold1.to_pylist()}
    # Mean@M: mean over inputs of the mean over candidates; base = 0.35
    assert got[("x", 0)]["mean"] == pytest.approx(0.1) and got[("x", 1)]["mean"] == pytest.approx(0.0)
    # Best@M: mean over inputs of the best candidate; base = (0.5 + 0.4) / 2
    assert got[("x", 0)]["best"] == pytest.approx(0.1) and got[("x", 0)]["worst"] == pytest.approx(0.1)
    fold2 = pa.Table.from_pylist(
        [
            {"fold": "f2", "method": "x", "train_seed": 0, "best": 0.3, "mean": 0.3, "worst": 0.3},
            {"fold": "f2", "method": "x", "train_seed": 1, "best": 0.0, "mean": 0.2, "worst": 0.0},
        ]
    )
    extra = pa.Table.from_pylist(
        [{"fold": "f2", "method": "x", "train_seed": 2, "best": 9.0, "mean": 9.0, "worst": 9.0}]
    )
    pooled = mini_repro_cv.average_over_folds(pa.concat_tables([fold1, fold2, extra]))
    by_seed = {r["train_seed"]: r["mean"] for r in pooled.to_pylist()}
    # seed 2 is missing from fold f1, so it does not count
    assert by_seed == pytest.approx({0: 0.2, 1: 0.1})


def test_cv_toy_run_reports_and_resumes_without_rerunning(mini_repro_cv, tmp_path, monkeypatch):
    argv = [
        "--cv-dir", str(tmp_path / "cv"), "--folds", "chelsea.png", "astronaut.png+retina.jpg",
        *TOY, "--methods", "4:1:uniform", "--jobs", "1", "--work-dir", str(tmp_path / "work"),
    ]  # fmt: skip
    pooled = mini_repro_cv.main(argv)
    assert pooled["method"].to_pylist() == ["m4-n1-uniform"] and pooled["seeds"].to_pylist() == [2]
    fold = tmp_path / "cv" / "chelsea.png"
    assert json.loads((fold / "results.json").read_text())["args"]["methods"] == ["4:1:uniform"]
    # a --methods run re-reported by --merge keeps its recipes
    mini_repro_cv.mini_repro.main(
        ["--merge", str(fold), "--out", str(tmp_path / "m.md"), "--plot-dir", str(tmp_path / "m")]
    )
    assert "`m4-n1-uniform` = m4-n1-uniform (M=4, N=1, uniform)" in (tmp_path / "m.md").read_text()
    text = (tmp_path / "cv" / "cv.md").read_text()
    assert (
        "| chelsea.png | m4-n1-uniform | 2 |" in text and "| astronaut.png+retina.jpg | m4-n1-uniform" in text
    )

    def fail(argv):
        raise AssertionError(f"fold rerun: {argv}")

    monkeypatch.setattr(mini_repro_cv.mini_repro, "main", fail)
    again = mini_repro_cv.main(argv)
    assert again.to_pylist() == pooled.to_pylist()
    with pytest.raises(SystemExit):  # the folds' split is the script's own
        mini_repro_cv.main([*argv, "--split", "heldout"])


def test_group_normalised_training_reward_spans_each_group(mini_repro):
    """`--train-normalization group`: candidates are ranked within their own input's range, whatever the scale
    of that input, while the evaluation model keeps its dataset bounds."""
    import pyarrow as pa

    from dp2o.evaluate.scoring import RewardModel

    args = mini_repro.parse_args([*TOY, "--train-normalization", "group", "--metrics", "psnr,entropy"])
    model = RewardModel(args.metrics)
    raw = pa.table(
        {
            "sample_id": ["a", "a", "a", "b", "b", "b"],
            "candidate": [0, 1, 2, 0, 1, 2],
            "psnr": [20.0, 21.0, 22.0, 30.0, 30.5, 31.0],
            "entropy": [5.0, 5.5, 6.0, 7.0, 7.1, 7.2],
        }
    )
    dataset = model.reward(raw)["reward"].to_pylist()
    bounds = json.dumps(model.bounds, sort_keys=True)
    group = mini_repro.training_rewards(raw, model, args)["reward"].to_pylist()
    assert group == pytest.approx([0.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    assert max(dataset[:3]) < 0.5 < min(dataset[3:])  # on the dataset scale input b is above input a
    # the evaluation scale is the one fitted by the dataset call, untouched by the training reward
    assert json.dumps(model.bounds, sort_keys=True) == bounds
    assert model.reward(raw)["reward"].to_pylist() == pytest.approx(dataset)


def test_heldout_option_takes_a_folder_of_photos_but_not_training_photos(mini_repro, tmp_path):
    import shutil

    from dp2o.data import bundled_files

    coffee, chelsea = bundled_files("bundled://heldout")[0], bundled_files("bundled://train")[1]
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(coffee, mine / "kitchen.png")
    args = mini_repro.parse_args([*TOY, "--heldout", str(mine)])
    _, uri, _, keep = mini_repro.split_sources(args.split, tuple(args.val_photos), args.heldout)
    assert uri == str(mine) and keep is None and f"`{mine}`" in mini_repro.split_words(args)
    ids, hr, _ = mini_repro.degraded_crops(uri, 2, 32, 0, "v", keep)
    assert hr.shape == (2, 3, 32, 32)
    shutil.copy(chelsea, mine / chelsea.name)
    with pytest.raises(SystemExit):
        mini_repro.parse_args([*TOY, "--heldout", str(mine)])


@pytest.mark.parametrize("photos", [["kitten.png"], list(BUNDLED_PHOTOS["train"])])
def test_val_photos_must_be_some_but_not_all_training_photos(mini_repro, photos, capsys):
    with pytest.raises(SystemExit):
        mini_repro.parse_args([*TOY, "--split", "photo-val", "--val-photos", *photos])
    assert "--val-photos" in capsys.readouterr().err


def test_over_photos_averages_per_photo_means_with_an_interval_over_photos(mini_repro):
    """The photo-level interval: mean over photos of each photo's seed-mean, t(0.975, df=P-1)·sd/√P."""
    rows = []
    for photo, value in (("a.png", -0.004), ("b.png", 0.002), ("c.png", 0.008)):
        rows.append({"photo": photo, "method": "m", "seeds": 5, "best": value, "mean": value, "worst": value})
        rows.append({"photo": photo, "method": "n", "seeds": 5, "best": 0.0, "mean": 0.001, "worst": 0.0})
    for row in rows:  # the over-seeds bounds of by_photo must not leak into the over-photos interval
        row.update({f"{s}_{e}": 9.0 for s in ("best", "mean", "worst") for e in ("lo", "hi")})
    out = {r["method"]: r for r in mini_repro.over_photos(pa.Table.from_pylist(rows)).to_pylist()}
    half = 4.302652729911275 * 0.006 / 3**0.5  # sd of (-0.004, 0.002, 0.008) is 0.006
    assert out["m"]["photos"] == 3
    assert out["m"]["mean"] == pytest.approx(0.002)
    assert (out["m"]["mean_lo"], out["m"]["mean_hi"]) == pytest.approx((0.002 - half, 0.002 + half))
    assert (out["n"]["mean"], out["n"]["mean_lo"], out["n"]["mean_hi"]) == pytest.approx((0.001,) * 3)
