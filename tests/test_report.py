"""`dp2o report`: the HTML page of a run root, its structure, that it is self-contained, and that a real
browser loads every image of it."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dp2o import registry
from dp2o.cli import main
from dp2o.errors import Dp2oError
from dp2o.plan import read_stage_table, resolve_stage_dir
from dp2o.report import write_report
from tests.browser import chromium_page
from tests.helpers import make_hr_folder, tiny_pipeline_config

pytestmark = pytest.mark.slow  # the module's run: a tiny pipeline through train, and evaluate (~1 min)

#: inputs the report shows in these tests (the run has 4)
SHOWN = 3


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A tiny run through train (2 photos x 2 crops of 80 px, M=4) plus an evaluate stage under the same root."""
    from dp2o.driver import run_pipeline, run_stage

    base = tmp_path_factory.mktemp("report")
    root = base / "runs"
    cfg = tiny_pipeline_config(
        str(root),
        str(make_hr_folder(base / "hr", n=2)),
        degrade={"crop_size": 80},  # the smallest crop the degradation chain takes: quick to sample
        evaluate={"num_candidates": 2, "batch_size": 8},
    )
    run_pipeline(cfg)
    ev = registry.get("evaluate")
    plan = ev.plan(
        cfg.evaluate,
        {"model": str(root / "train"), "heldout": str(root / "degrade")},
        root=str(root),
        storage_options={},
        runtime=ev.runtime_of(cfg),
    )
    run_stage(plan)
    return root


@pytest.fixture(scope="module")
def report(run_root) -> Path:
    out = Path(write_report(str(run_root), inputs=SHOWN))
    assert out == run_root / "report.html"
    return out


class _Page(HTMLParser):
    """Sections, stage blocks, input blocks with their figures, images, links and charts of a report."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.stages: list[str] = []
        self.inputs: list[dict] = []
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.svgs = 0
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.sections[a["id"]] = a
        if tag == "div" and a.get("class") == "stage":
            self.stages.append(a["data-stage"])
        if tag == "div" and a.get("class") == "input":
            self.inputs.append({"sample_id": a["data-sample-id"], "figures": []})
        if tag == "figure" and self.inputs:
            self.inputs[-1]["figures"].append(a)
        if tag == "img":
            self.srcs.append(a["src"])
        if "href" in a:
            self.hrefs.append(a["href"])
        if tag == "svg":
            self.svgs += 1


def _parse(path: Path) -> tuple[str, _Page]:
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    return text, page


def test_every_stage_has_a_section(run_root, report):
    _, page = _parse(report)
    expected = [s.name for s in registry.pipeline_stages()] + ["evaluate"]
    assert page.stages == expected
    assert {"stages", "inputs", "rewards", "train", "evaluate"} <= set(page.sections)
    text = report.read_text()
    for stage in expected:
        (run,) = [p for p in (run_root / stage).iterdir() if (p / "_MANIFEST.json").exists()]
        assert run.name in text and str(run) in text, stage  # fingerprint and folder
    assert "not run" not in text.split("<section id='inputs'")[0]


def test_sampled_inputs_are_spread_and_sorted_by_reward(run_root, report):
    _, page = _parse(report)
    reward = read_stage_table(resolve_stage_dir(str(run_root / "reward"))).to_pylist()
    ids = sorted({r["sample_id"] for r in reward})
    assert len(ids) > SHOWN
    assert page.sections["inputs"]["data-inputs"] == str(SHOWN)
    shown = [i["sample_id"] for i in page.inputs]
    assert len(shown) == SHOWN and shown[0] == ids[0] and shown[-1] == ids[-1]  # evenly spread, ends kept
    for block in page.inputs:
        figs = block["figures"]
        assert [f["data-which"] for f in figs[:2]] == ["lr", "hr"]
        cands = figs[2:]
        mine = {r["candidate"]: r["reward"] for r in reward if r["sample_id"] == block["sample_id"]}
        assert sorted(int(f["data-candidate"]) for f in cands) == sorted(mine)
        rewards = [float(f["data-reward"]) for f in cands]
        assert rewards == sorted(rewards, reverse=True)
        assert rewards == pytest.approx(sorted(mine.values(), reverse=True), rel=1e-9)
        assert [int(f["data-rank"]) for f in cands] == list(range(1, len(cands) + 1))


def test_winners_and_losers_match_the_pairs_table(run_root, report):
    text, page = _parse(report)
    pairs = read_stage_table(resolve_stage_dir(str(run_root / "pairs"))).to_pylist()
    for block in page.inputs:
        mine = [p for p in pairs if p["sample_id"] == block["sample_id"]]
        assert mine
        roles = {int(f["data-candidate"]): f["data-role"] for f in block["figures"][2:]}
        assert {c for c, r in roles.items() if "win" in r} == {p["win"] for p in mine}
        assert {c for c, r in roles.items() if "lose" in r} == {p["lose"] for p in mine}
        assert all(
            r == "" for c, r in roles.items() if c not in {p["win"] for p in mine} | {p["lose"] for p in mine}
        )
    assert text.count("class='tag win'>win</span> vs c") >= sum(
        1 for p in pairs if p["sample_id"] in {b["sample_id"] for b in page.inputs}
    )


def test_charts_and_evaluation(report):
    text, page = _parse(report)
    assert page.svgs >= 3  # the reward histogram, a metric's, the loss and accuracy curves
    assert "reward (" in text and "train loss" in text and "implicit accuracy" in text
    ev = text.split("<section id='evaluate'")[1]
    assert "<b>base</b>" in ev and "<b>tuned</b>" in ev and "<b>tuned-base</b>" in ev
    assert "Best@M" in ev and "Mean@M" in ev and "Worst@M" in ev


def test_nothing_points_outside_the_page(report):
    text, page = _parse(report)
    assert page.srcs and all(
        s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in page.srcs
    )
    assert all(h.startswith("#") for h in page.hrefs), page.hrefs
    # the SVG namespace name is an identifier, never fetched (the browser test checks no request leaves)
    text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert not re.search(r"https?://|(src|href)\s*=\s*[\"']//|url\(", text)
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}


def test_a_browser_loads_every_image(report):
    with chromium_page() as page:
        outside: list[str] = []
        page.on(
            "request", lambda r: outside.append(r.url) if not r.url.startswith(("data:", "file:")) else None
        )
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate(
            "() => [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, alt: i.alt}))"
        )
        charts = page.evaluate("() => document.querySelectorAll('svg.chart').length")
        shown = page.evaluate("() => document.querySelectorAll('div.input').length")
    assert images and all(i["ok"] for i in images), [i for i in images if not i["ok"]]
    assert len(images) == SHOWN * (2 + 4)  # LR, HR and M=4 candidates per input
    assert charts >= 3 and shown == SHOWN
    assert not outside, outside


def test_a_run_stopped_after_sample_gets_a_report(run_root, tmp_path):
    root = tmp_path / "runs"
    for stage in ("degrade", "sample"):
        shutil.copytree(run_root / stage, root / stage)
    out = Path(write_report(str(root), str(tmp_path / "r.html"), inputs=2))
    text, page = _parse(out)
    assert page.stages == [s.name for s in registry.pipeline_stages()]
    for stage in ("score", "reward", "pairs", "train"):
        block = text.split(f'id="stage-{stage}"')[1].split("</div>")[0]
        assert "not run" in block, stage
    assert len(page.inputs) == 2 and all(len(b["figures"]) == 2 + 4 for b in page.inputs)
    assert "not scored yet" in text and all(f["data-role"] == "" for f in page.inputs[0]["figures"][2:])


def test_report_of_a_remote_root(run_root, tmp_path):
    """An fsspec URL (memory://): stages found by fingerprint under the root, images downloaded per shard."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(run_root), "/report-test/runs", recursive=True)
    try:
        out = write_report("memory://report-test/runs", str(tmp_path / "remote.html"), inputs=1)
        _, page = _parse(Path(out))
        assert len(page.inputs) == 1 and len(page.srcs) == 2 + 4
        assert "memory://report-test/runs/sample/" in Path(out).read_text()
        assert write_report("memory://report-test/runs", inputs=1) == "memory://report-test/runs/report.html"
        assert fs.exists("/report-test/runs/report.html")
    finally:
        fs.rm("/report-test", recursive=True)


def test_cli(run_root, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", str(run_root), "--out", str(out), "--inputs", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len(_parse(out)[1].inputs) == 2
    assert main(["report", str(run_root), "--inputs", "0"]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'} holds no stage folders" in err and "run root" in err
    (stage_dir,) = (run_root / "pairs").iterdir()
    assert main(["report", str(stage_dir)]) == 1
    assert "is a stage folder, not a run root" in capsys.readouterr().err
    with pytest.raises(Dp2oError, match="not a finished evaluate stage folder"):
        write_report(str(run_root), str(tmp_path / "x.html"), evaluate=str(tmp_path / "empty"))
