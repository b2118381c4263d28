"""`dp2o plan`: the arithmetic matches a hand computation, every figure names its source, and the paper-scale
config loads and plans."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest

from dp2o import estimate, registry
from dp2o.config import ConfigError, PipelineConfig, load_config

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "dp2o" / "configs" / "paper.yaml"
SAMPLE_GPU = REPO / "benchmarks" / "results" / "gpu" / "sample_gpu.json"

#: a small run: 10 photos x 2 crops, M=4, N=1, 5 steps x 8 pairs, 2 metrics
SMALL = [
    "degrade.crop_size=128",
    "degrade.crops_per_image=2",
    "degrade.images_per_shard=4",
    "sample.num_candidates=4",
    "score.metrics=[psnr, ssim]",
    "pairs.n_top=1",
    "train.steps=5",
    "train.pairs_per_step=8",
    "train.checkpoint_every=2",
    "train.keep_last=2",
]
#: every per-item figure fixed, so the plan is pure arithmetic
COSTS = {
    "degrade.s_per_crop": 2,
    "png.encode_s_per_mp": 10,
    "png.decode_s_per_mp": 5,
    "degrade.photo_mp": 1,
    "degrade.hr_png_bytes_per_px": 2,
    "degrade.lr_png_bytes_per_px": 3,
    "degrade.parquet_bytes_per_row": 100,
    "degrade.parquet_bytes_per_file": 1000,
    "tar.bytes_per_member": 500,
    "tar.bytes_per_file": 4000,
    "sample.s_per_candidate": 3,
    "sample.png_bytes_per_px": 1,
    "sample.parquet_bytes_per_row": 10,
    "parquet.bytes_per_file": 2000,
    "score.s_per_candidate_metric": 0.5,
    "score.parquet_bytes_per_row": 20,
    "score.parquet_bytes_per_metric": 8,
    "reward.s_per_row_metric": 0.01,
    "reward.parquet_bytes_per_row": 9,
    "pairs.s_per_candidate": 0.2,
    "pairs.s_per_pair": 0.1,
    "pairs.parquet_bytes_per_row": 30,
    "train.s_per_pair": 4,
    "train.params": 1000,
    "train.checkpoint_bytes_per_param": 12,
    "train.model_bytes_per_param": 4,
}


def parser() -> argparse.ArgumentParser:
    """`dp2o plan`'s parser as the CLI builds it: the common --config/--set plus add_arguments."""
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    estimate.add_arguments(p)
    return p


def plan_json(capsys, *argv: str) -> dict:
    assert estimate.run(parser().parse_args([*argv, "--json"])) == 0
    return json.loads(capsys.readouterr().out)


def small_argv(*extra: str, costs: dict = COSTS) -> list[str]:
    argv = ["--inputs", "10", "--gpu", "a100", "--price-per-gpu-hour", "2", "--price-per-cpu-hour", "0.1"]
    for s in SMALL:
        argv += ["--set", s]
    for k, v in costs.items():
        argv += ["--set-cost", f"{k}={v}"]
    return [*argv, *extra]


def test_small_plan_matches_a_hand_computation(capsys):
    plan = plan_json(capsys, *small_argv())
    speed = estimate.GPU_KINDS["a100"].speed  # GPU-seconds are H100 seconds / speed
    hr_mp, lr_mp = 128 * 128 / 1e6, 32 * 32 / 1e6
    # 10 photos -> 20 LR inputs -> 80 candidates -> 20 pairs (1x1 per input); 5 x 8 = 40 pair passes
    assert plan["counts"] == {
        "photos": 10,
        "lr_inputs": 20,
        "candidates": 80,
        "pairs": 20,
        "pair_passes": 40,
    }
    expected = {
        # stage: (shards, task runs, seconds, storage bytes)
        "degrade": (
            3,  # ceil(10 / 4)
            4,  # 3 shard tasks + finalize
            10 * 1 * 5 + 20 * (2 + (hr_mp + lr_mp) * 10),  # decode photos + degrade + encode HR and LR
            20 * (16384 * 2 + 1024 * 3) + (40 * 500 + 3 * 4000) + (20 * 100 + 3 * 1000),
        ),
        "sample": (
            3,
            4,
            80 * 3 / speed + 80 * hr_mp * 10,  # sampling on the GPU + PNG encoding on the host
            80 * 16384 * 1 + (80 * 500 + 3 * 4000) + (80 * 10 + 3 * 2000),
        ),
        "score": (3, 4, 80 * 2 * 0.5 / speed + (80 + 20) * hr_mp * 5, 80 * (20 + 2 * 8) + 3 * 2000),
        "reward": (3, 2, 80 * 2 * 0.01, 80 * (20 + 2 * 8 + 9) + 3 * 2000),
        "pairs": (1, 2, 80 * 0.2 + 20 * 0.1, 20 * 30 + 2000),
        # checkpoints at steps 2 and 4, both kept: 2 x 12 B/param, plus the fp32 model
        "train": (1, 2, 40 * 4 / speed, 2 * 1000 * 12 + 1000 * 4),
    }
    rows = {r["stage"]: r for r in plan["stages"]}
    assert list(rows) == [s.name for s in registry.pipeline_stages()]
    for name, (shards, tasks, seconds, storage) in expected.items():
        r = rows[name]
        assert (r["shards"], r["task_runs"]) == (shards, tasks), name
        assert r["hours"] == pytest.approx(seconds / 3600), name
        price = 2 if r["resources"] == "gpu" else 0.1
        assert r["cost"] == pytest.approx(seconds / 3600 * price), name
        assert r["storage_bytes"] == pytest.approx(storage), name
    gpu_s = sum(v[2] for k, v in expected.items() if rows[k]["resources"] == "gpu")
    cpu_s = sum(v[2] for k, v in expected.items() if rows[k]["resources"] == "cpu")
    t = plan["totals"]
    assert t["gpu_hours"] == pytest.approx(gpu_s / 3600)
    assert t["cpu_hours"] == pytest.approx(cpu_s / 3600)
    assert t["cost"] == pytest.approx(gpu_s / 3600 * 2 + cpu_s / 3600 * 0.1)
    assert t["storage_bytes"] == pytest.approx(sum(v[3] for v in expected.values()))
    assert t["task_runs"] == 18
    # every given figure was used and is reported as given
    figures = {f["key"]: f for f in plan["figures"]}
    for key, value in COSTS.items():
        assert figures[key]["value"] == value
        assert figures[key]["source"] == f"given: --set-cost {key}={value:g}"


def test_a_degrade_task_carries_its_own_shard_only(capsys):
    """Shard tasks get plan.only(spec): the degrade task parameter does not grow with the number of photos
    (it once carried every source ref of the plan: 2.3 MB at 30,000 photos)."""
    small = plan_json(capsys, *small_argv())["stages"][0]["largest_param"]
    ten_times = plan_json(capsys, *small_argv("--inputs", "100"))["stages"][0]["largest_param"]
    paper = plan_json(capsys, "--config", str(PAPER), "--inputs", "30000", "--json")["stages"][0][
        "largest_param"
    ]
    assert abs(ten_times["json_bytes"] - small["json_bytes"]) < 64  # digits of longer indices, not 90 refs
    assert paper["under_limit"] and paper["json_bytes"] < 64 * 1024
    for p in (small, ten_times):
        assert p["under_limit"] == (max(p["pickle_bytes"], p["json_bytes"]) <= estimate.PREFECT_PARAM_LIMIT)


def _check_source(fig: dict) -> None:
    """A source is a file and a key that exist, an assumption that says how to override it, or a given value."""
    src, key = fig["source"], fig["key"]
    if src.startswith("assumption: "):
        assert f"(override with --set-cost {key}=VALUE)" in src, fig
        return
    if src.startswith("given: "):
        return
    m = re.match(r"(?:1 / )?(\S+) (\S+)", src)
    assert m, fig
    path, json_key = m.group(1), m.group(2).rstrip(",")
    assert (REPO / path).is_file(), fig
    if path == "dp2o/estimate.py":
        name = re.fullmatch(r"RECORDED\['(\w+)'\]", json_key).group(1)
        assert estimate.RECORDED[name][1], fig  # a recorded figure says how it was measured
    else:
        node = json.loads((REPO / path).read_text())
        for part in json_key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert isinstance(node, int | float), fig


def test_paper_config_loads_with_the_papers_values():
    cfg = load_config(PipelineConfig, PAPER)
    assert cfg.sample.backend.kind == "sd2-controlnet"
    assert cfg.sample.backend.model == "stabilityai/stable-diffusion-2-base"
    assert (cfg.sample.backend.num_inference_steps, cfg.sample.backend.guidance_scale) == (50, 3.5)
    assert (cfg.sample.num_candidates, cfg.pairs.n_top) == (32, 8)
    assert cfg.score.metrics == "paper" and cfg.score.reward.fr_weight == 0.5
    assert (cfg.train.steps, cfg.train.pairs_per_step, cfg.train.beta) == (1000, 1024, 5000)
    assert cfg.train.learning_rate == 2e-5
    assert cfg.degrade.crop_size == 512
    # the placeholders are labelled as such in the file
    text = PAPER.read_text()
    assert text.count("PLACEHOLDER") >= 3


def test_paper_plan_at_30k_inputs_prints_the_table_and_names_every_source(capsys):
    argv = ["--config", str(PAPER), "--inputs", "30000", "--gpu", "h100", "--price-per-gpu-hour", "2.5"]
    plan = plan_json(capsys, *argv)
    assert plan["counts"] == {
        "photos": 30_000,
        "lr_inputs": 30_000,
        "candidates": 960_000,
        "pairs": 1_920_000,
        "pair_passes": 1_024_000,
    }
    rows = {r["stage"]: r for r in plan["stages"]}
    assert rows["degrade"]["shards"] == math.ceil(30_000 / 64)
    for r in plan["stages"]:
        assert r["modelled"] and r["figures"], r["stage"]
        assert r["hours_unit"] == ("GPU-h" if r["resources"] == "gpu" else "CPU-h")
    # the sampling cost is the measured H100 figure for C-SD2 at the paper's settings (50 steps, CFG, 512 px)
    figures = {f["key"]: f for f in plan["figures"]}
    measured = json.loads(SAMPLE_GPU.read_text())["sd2"]["ours"]["s_per_candidate"]
    assert figures["sample.s_per_candidate"]["value"] == pytest.approx(measured)
    for fig in plan["figures"]:
        _check_source(fig)

    assert estimate.run(parser().parse_args(argv)) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("stage "))
    for col in ("shards", "tasks", "items", "hours", "cost", "storage", "largest param"):
        assert col in header
    for name in rows:
        assert re.search(rf"^{name} +(cpu|gpu) +[\d,]+ +[\d,]+ ", text, re.M), name
    for fig in plan["figures"]:  # every figure is printed with its source
        assert fig["source"] in text
    assert "512 KB" in text


def test_measured_speed_is_scaled_to_the_configs_steps(capsys):
    base = ["--config", str(PAPER), "--inputs", "100"]
    full = plan_json(capsys, *base)
    half = plan_json(capsys, *base, "--set", "sample.backend.num_inference_steps=25")
    f = {x["key"]: x for x in full["figures"]}["sample.s_per_candidate"]
    h = {x["key"]: x for x in half["figures"]}["sample.s_per_candidate"]
    assert h["value"] == pytest.approx(f["value"] / 2)
    assert "x 25/50 steps" in h["source"]


def test_bundled_input_is_counted_and_a_remote_one_needs_inputs(capsys):
    plan = plan_json(capsys, "--config", str(REPO / "dp2o" / "configs" / "demo.yaml"))
    from dp2o.data import bundled_files

    assert plan["counts"]["photos"] == len(bundled_files("bundled://train"))
    with pytest.raises(ConfigError, match="--inputs N is required"):
        estimate.run(parser().parse_args(["--config", str(PAPER)]))


def test_an_unknown_or_malformed_cost_key_is_refused():
    with pytest.raises(ConfigError, match="did you mean sample.s_per_candidate"):
        estimate.run(parser().parse_args(small_argv("--set-cost", "sample.s_per_candidat=1")))
    with pytest.raises(ConfigError, match="KEY=NUMBER"):
        estimate.run(parser().parse_args(small_argv("--set-cost", "sample.s_per_candidate=fast")))


def test_a_stage_without_a_cost_model_is_listed_and_left_out_of_the_totals(capsys, monkeypatch):
    full = plan_json(capsys, *small_argv())
    monkeypatch.delitem(estimate.COST_MODELS, "pairs")
    # without the pairs model its figures are unused, and an unused --set-cost key is an error
    argv = small_argv(costs={k: v for k, v in COSTS.items() if not k.startswith("pairs.")})
    plan = plan_json(capsys, *argv)
    assert plan["unmodelled_stages"] == ["pairs"]
    pairs_row = next(r for r in full["stages"] if r["stage"] == "pairs")
    assert plan["totals"]["cpu_hours"] == pytest.approx(full["totals"]["cpu_hours"] - pairs_row["hours"])
    assert estimate.run(parser().parse_args(argv)) == 0
    assert "no cost model" in capsys.readouterr().out


def test_without_benchmark_files_the_last_measured_values_are_used_as_labelled_assumptions(
    capsys, monkeypatch
):
    """An installed wheel has no benchmarks/ folder: the plan still runs, on the recorded values, and says so."""
    argv = ["--config", str(PAPER), "--inputs", "1000"]
    here = {f["key"]: f for f in plan_json(capsys, *argv)["figures"]}
    monkeypatch.setattr(estimate, "REPO", REPO / "no-such-folder")
    gone = {f["key"]: f for f in plan_json(capsys, *argv)["figures"]}
    assert gone.keys() == here.keys()
    for key, fig in here.items():
        assert gone[key]["value"] == pytest.approx(fig["value"], rel=1e-3), key  # recorded to 4-5 digits
        if fig["source"].startswith(("benchmarks/", "1 / benchmarks/")):
            assert (
                gone[key]["source"].startswith("assumption: ") and "as last measured" in gone[key]["source"]
            )
