"""`dp2o inspect` on a run root / stage folders, `dp2o.images.open_image`, and the README's query snippet."""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dp2o.cli import main
from dp2o.images import image_ref, open_image
from dp2o.plan import read_stage_table, resolve_stage_dir
from dp2o.tario import decode_png
from tests.helpers import make_hr_folder, tiny_pipeline_config

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    from dp2o.driver import run_pipeline

    base = tmp_path_factory.mktemp("inspect")
    cfg = tiny_pipeline_config(str(base / "runs"), str(make_hr_folder(base / "hr")))
    run_pipeline(cfg, until="pairs")
    return base / "runs"


def _member(tar_path: str, member: str) -> np.ndarray:
    with tarfile.open(tar_path) as tf:
        return decode_png(tf.extractfile(member).read())


def test_overview_lists_every_stage(run_root, capsys):
    assert main(["inspect", str(run_root)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(lines)[:6] == ["degrade", "sample", "score", "reward", "pairs", "train"]
    for stage in ("degrade", "sample", "score", "reward", "pairs"):
        m = read_stage_table(resolve_stage_dir(str(run_root / stage)))
        assert "finished" in lines[stage] and f"rows {m.num_rows} " in lines[stage], lines[stage]
    assert "not started" in lines["train"]


def test_stage_of_root_shows_its_manifest(run_root, capsys):
    assert main(["inspect", str(run_root / "sample")]) == 0
    assert '"stage": "sample"' in capsys.readouterr().out


def test_in_progress_stage_counts_committed_shards(run_root, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(run_root, root)
    (run,) = (root / "sample").iterdir()
    (run / "_MANIFEST.json").unlink()
    sorted((run / "_markers").glob("*.json"))[0].unlink()
    assert main(["inspect", str(root)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == ["sample"])
    assert "in progress: 1 of 2 shards committed" in line, line
    assert main(["inspect", str(root / "sample")]) == 0
    assert "in progress: 1 of 2" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["lr", "hr"])
def test_open_image_degrade(run_root, which):
    stage = str(run_root / "degrade")
    row = read_stage_table(resolve_stage_dir(stage)).to_pylist()[-1]
    url, member = image_ref(row, stage, which)
    assert member == f"{row['sample_id']}.{which}.png"
    np.testing.assert_array_equal(open_image(row, stage, which), _member(url, member))


@pytest.mark.parametrize("stage", ["sample", "reward"])
def test_open_image_candidate(run_root, stage):
    url_of = str(run_root / stage)
    row = read_stage_table(resolve_stage_dir(url_of)).to_pylist()[-1]
    url, member = image_ref(row, url_of)
    assert "/sample/" in url and member == f"{row['sample_id']}_{row['candidate']:03d}.sr.png"
    img = open_image(row, url_of)
    assert img.dtype == np.uint8 and img.ndim == 3
    np.testing.assert_array_equal(img, _member(url, member))
    lr_url, lr_member = image_ref(row, url_of, "lr")
    np.testing.assert_array_equal(open_image(row, url_of, "lr"), _member(lr_url, lr_member))


def test_open_image_catches_a_damaged_member(run_root, tmp_path):
    from dp2o.errors import StageError

    root = tmp_path / "runs"
    shutil.copytree(run_root, root)
    stage = str(root / "sample")
    row = read_stage_table(resolve_stage_dir(stage)).to_pylist()[0]
    url, member = image_ref(row, stage)
    with tarfile.open(url) as tf:
        info = tf.getmember(member)
    data = bytearray(Path(url).read_bytes())
    data[info.offset_data + info.size // 2] ^= 0xFF
    Path(url).write_bytes(bytes(data))
    with pytest.raises(StageError, match="corrupted"):
        open_image(row, stage)


def test_readme_snippet_runs(run_root, capsys):
    text = README.read_text()
    section = text[text.index("### Inspecting data") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'root = "runs/demo"' in code
    scope: dict = {}
    exec(compile(code.replace('"runs/demo"', repr(str(run_root))), "README.md", "exec"), scope)
    assert "sample_id" in capsys.readouterr().out
    winners = scope["winners"]
    assert len(winners) == len(read_stage_table(resolve_stage_dir(str(run_root / "pairs"))))
    assert (winners["reward"] == winners["reward_win"]).all() and scope["metrics"]
    assert scope["img"].dtype == np.uint8 and scope["lr"].shape[0] < scope["img"].shape[0]


# ---- field descriptions in every Parquet file -------------------------------------------------------------


def _assert_documented(schema, stage: str, where: str) -> None:
    from dp2o.reward.registry import METRICS
    from dp2o.schemas import column_docs

    assert (schema.metadata or {}).get(b"dp2o.stage") == stage.encode(), where
    docs = column_docs(schema)
    undocumented = [name for name, d in docs.items() if not d.get("description")]
    assert not undocumented, f"{where}: columns without a description: {undocumented}"
    for name in docs:
        if name in METRICS or name == "reward":
            assert docs[name].get("better") in ("higher", "lower"), f"{where}: {name} has no direction"
            assert "unit" in docs[name], f"{where}: {name} has no unit field"


@pytest.mark.parametrize("stage", ["degrade", "sample", "score", "reward", "pairs"])
def test_every_parquet_column_is_described(run_root, stage):
    import pyarrow.parquet as pq

    files = sorted((run_root / stage).glob("*/data/*.parquet"))
    assert files
    for f in files:
        _assert_documented(pq.read_schema(f), stage, str(f))


def test_metric_columns_carry_unit_and_direction(run_root):
    import pyarrow.parquet as pq

    from dp2o.schemas import column_docs

    (f, *_) = sorted((run_root / "score").glob("*/data/*.parquet"))
    docs = column_docs(pq.read_schema(f))
    assert docs["psnr"]["unit"] == "dB" and docs["psnr"]["better"] == "higher"
    assert docs["gmsd"]["better"] == "lower" and docs["brisque"]["better"] == "lower"


def test_train_and_evaluate_tables_are_described():
    """The tables of the stages the module's run does not reach, through the same writers' schemas."""
    import pyarrow as pa

    from dp2o.evaluate.stage import candidates_schema
    from dp2o.evaluate.summary import SUMMARY_COLUMNS
    from dp2o.schemas import documented
    from dp2o.train.loop import METRIC_COLUMNS
    from dp2o.train.stage import COLUMNS

    metrics = documented(pa.table({k: [1.0] for k in METRIC_COLUMNS}), "train", COLUMNS)
    _assert_documented(metrics.schema, "train", "train metrics")
    _assert_documented(candidates_schema(["psnr", "piqe"]), "evaluate", "evaluate candidates")
    assert set(SUMMARY_COLUMNS) >= {"model", "statistic", "at_m", "value", "lo", "hi"}


def test_inspect_a_parquet_file_prints_column_docs(run_root, capsys):
    (f, *_) = sorted((run_root / "score").glob("*/data/*.parquet"))
    assert main(["inspect", str(f), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "written by stage score" in out
    assert re.search(r"psnr\s+double\s+raw psnr score.*\[dB\] \(higher is better\)", out), out
