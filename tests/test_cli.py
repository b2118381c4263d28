"""The `dp2o` command: stages alone with explicit locations, clear failures, inspect and verify."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dp2o.cli import main


def _scores(path, groups=5, m=8, seed=0):
    rng = np.random.default_rng(seed)
    rows = {"sample_id": [], "candidate": [], "reward": [], "extra": []}
    for g in range(groups):
        mg = m + g  # groups with different M
        rows["sample_id"] += [f"img-{g}"] * mg
        rows["candidate"] += list(range(mg))
        rows["reward"] += rng.random(mg).tolist()
        rows["extra"] += ["x"] * mg
    pq.write_table(pa.table(rows), path)


def test_pairs_alone_from_any_parquet_file(tmp_path, capsys):
    _scores(tmp_path / "scores.parquet")
    out = tmp_path / "pairs"
    rc = main(
        [
            "pairs",
            "--scores",
            str(tmp_path / "scores.parquet"),
            "--out",
            str(out),
            "--n-top",
            "2",
            "--weighting",
            "hpo",
            "--orchestrator",
            "local",
        ]
    )
    assert rc == 0
    files = sorted((out / "data").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert {"sample_id", "win", "lose", "reward_win", "reward_lose", "w_intra", "w_inter", "weight"} <= set(
        table.column_names
    )
    assert table.num_rows == 5 * 2 * 2
    assert np.isclose(table["weight"].to_numpy().mean(), 1.0, atol=0.05)
    assert (out / "_MANIFEST.json").exists()


def test_pairs_alone_from_a_folder_uniform(tmp_path):
    (tmp_path / "s").mkdir()
    _scores(tmp_path / "s" / "a.parquet", groups=2, seed=1)
    _scores(tmp_path / "s" / "b.parquet", groups=2, seed=2)
    # the two files hold different inputs: give b its own sample ids
    t = pq.read_table(tmp_path / "s" / "b.parquet")
    t = t.set_column(0, "sample_id", pa.array([f"b-{s}" for s in t["sample_id"].to_pylist()]))
    pq.write_table(t, tmp_path / "s" / "b.parquet")
    out = tmp_path / "pairs"
    assert (
        main(
            [
                "pairs",
                "--scores",
                str(tmp_path / "s"),
                "--out",
                str(out),
                "--n-top",
                "1",
                "--weighting",
                "uniform",
                "--orchestrator",
                "local",
            ]
        )
        == 0
    )
    table = pq.read_table(next((out / "data").glob("*.parquet")))
    assert table.num_rows == 4
    assert (table["weight"].to_numpy() == 1.0).all()


def test_pairs_missing_reward_column_is_named(tmp_path, capsys):
    pq.write_table(pa.table({"sample_id": ["a"], "candidate": [0]}), tmp_path / "s.parquet")
    rc = main(
        [
            "pairs",
            "--scores",
            str(tmp_path / "s.parquet"),
            "--out",
            str(tmp_path / "o"),
            "--orchestrator",
            "local",
        ]
    )
    assert rc == 1
    assert "reward" in capsys.readouterr().err


def test_malformed_config_fails_before_work_naming_field(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("root: %s\nsample:\n  num_candidates: many\n" % (tmp_path / "run"))
    rc = main(["run", "--config", str(cfg), "--orchestrator", "local"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "sample.num_candidates" in err and "bad.yaml" in err
    assert not (tmp_path / "run").exists()


def test_output_folder_of_another_config_is_refused(tmp_path, capsys):
    _scores(tmp_path / "scores.parquet")
    out = tmp_path / "pairs"
    base = [
        "pairs",
        "--scores",
        str(tmp_path / "scores.parquet"),
        "--out",
        str(out),
        "--orchestrator",
        "local",
    ]
    assert main([*base, "--n-top", "1"]) == 0
    assert main([*base, "--n-top", "2"]) == 1
    assert "another config" in capsys.readouterr().err


def test_inspect_and_verify(tmp_path, capsys):
    _scores(tmp_path / "scores.parquet")
    out = tmp_path / "pairs"
    # n_top 2: the groups hold 8..12 candidates, fewer than the default 2 * 8
    args = ["pairs", "--scores", str(tmp_path / "scores.parquet"), "--out", str(out), "--n-top", "2"]
    assert main([*args, "--orchestrator", "local"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert '"stage": "pairs"' in capsys.readouterr().out
    assert main(["inspect", str(next((out / "data").glob("*.parquet")))]) == 0
    assert "w_inter" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    f = next((out / "data").glob("*.parquet"))
    data = bytearray(f.read_bytes())
    data[20] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1


@pytest.mark.slow
def test_console_script_is_installed():
    from importlib.metadata import entry_points
    from pathlib import Path

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "dp2o"]
    assert ep.value == "dp2o.cli:main"
    script = Path(sys.executable).parent / "dp2o"
    assert script.exists(), f"{script} missing: is the package installed (pip install -e .)?"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for cmd in ("run", "demo", "degrade", "sample", "score", "reward", "pairs", "train", "inspect", "verify"):
        assert cmd in r.stdout


@pytest.mark.slow
def test_every_stage_alone_with_explicit_locations(tmp_path):
    import yaml

    from tests.helpers import make_hr_folder, tiny_pipeline_config

    hr = make_hr_folder(tmp_path / "hr", n=2)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(tiny_pipeline_config(str(tmp_path / "unused"), str(hr)).model_dump(mode="json"))
    )
    x = tmp_path / "x"
    common = ["--config", str(cfg), "--orchestrator", "local"]
    assert main(["degrade", "--input", str(hr), "--out", str(x / "degrade"), *common]) == 0
    assert (
        main(
            [
                "sample",
                "--input",
                str(x / "degrade"),
                "--out",
                str(x / "sample"),
                "--num-candidates",
                "4",
                *common,
            ]
        )
        == 0
    )
    assert main(["score", "--input", str(x / "sample"), "--out", str(x / "score"), *common]) == 0
    assert (x / "score-reward" / "_MANIFEST.json").exists()
    assert (
        main(
            [
                "reward",
                "--scores",
                str(x / "score"),
                "--out",
                str(x / "reward-group"),
                "--set",
                "score.reward.normalization=group",
                *common,
            ]
        )
        == 0
    )
    assert main(["pairs", "--scores", str(x / "reward-group"), "--out", str(x / "pairs"), *common]) == 0
    assert (
        main(
            [
                "train",
                "--pairs",
                str(x / "pairs"),
                "--samples",
                str(x / "sample"),
                "--out",
                str(x / "train"),
                "--steps",
                "2",
                *common,
            ]
        )
        == 0
    )
    assert (x / "train" / "data" / "metrics.parquet").exists()
    assert not (tmp_path / "unused").exists()


def _run_demo_with(root, override: str) -> int:
    """`dp2o run` of the demo config under `root` with one `--set` override (local orchestrator)."""
    from dp2o.cli import DEMO_CONFIG

    return main(
        [
            "run",
            "--config",
            str(DEMO_CONFIG),
            "--root",
            str(root),
            "--orchestrator",
            "local",
            "--set",
            override,
        ]
    )


def test_missing_model_weights_fail_before_any_stage_runs(tmp_path, capsys):
    root = tmp_path / "run"
    rc = _run_demo_with(root, f"sample.backend.model={tmp_path / 'no-such-model'}")
    assert rc == 1
    err = capsys.readouterr().err
    assert "BackendConfig.model" in err and "no-such-model" in err
    assert not root.exists()  # nothing was degraded first


def test_missing_metric_weights_fail_before_any_stage_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    root = tmp_path / "run"
    rc = _run_demo_with(root, "score.metrics=[psnr, lpips]")
    assert rc == 1
    assert "lpips" in capsys.readouterr().err
    assert not root.exists()
