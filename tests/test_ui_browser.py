"""The Prefect UI, in a real headless browser, against a real Prefect server: a tiny pipeline run's artifacts
render with their pictures loaded, and the deployment's "Custom run" form shows readable descriptions.

Set DP2O_SCREENSHOTS=DIR to keep the screenshots (docs/ui/ holds the committed ones, made this way)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.browser import chromium_page
from tests.helpers import make_hr_folder, tiny_pipeline_config
from tests.prefect_server import prefect_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: markdown artifacts that carry pictures, and how many each holds at least
PICTURES = {"train-curve": 2, "reward-pictures": 2, "pairs-picture": 1}


def _shot(page, tmp_path: Path, name: str) -> None:
    keep = os.environ.get("DP2O_SCREENSHOTS")
    folder = Path(keep) if keep else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def _images(page) -> list[dict]:
    return page.eval_on_selector_all(
        "img", "els => els.map(e => ({src: e.src.slice(0, 40), ok: e.complete && e.naturalWidth > 0}))"
    )


def _wait_images(page, n: int, timeout_ms: int = 30000) -> list[dict]:
    page.wait_for_function(
        f"Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length >= {n}",
        timeout=timeout_ms,
    )
    return _images(page)


def _post(server, path: str, body: dict) -> list[dict]:
    r = httpx.post(f"{server.api}/{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def ui_run(tmp_path_factory):
    """A real server, a tiny pipeline run through `dp2o run` (the Prefect orchestrator) and a deployment."""
    tmp = tmp_path_factory.mktemp("ui")
    hr = make_hr_folder(tmp / "hr", n=2)
    cfg = tiny_pipeline_config(str(tmp / "runs"), str(hr))
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with prefect_server(tmp) as server:
        env = server.env(DP2O_TEST_TORCH_THREADS="1", OMP_NUM_THREADS="1")
        run = subprocess.run(
            [sys.executable, "-m", "dp2o.cli", "run", "--config", str(config)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        apply = subprocess.run(
            [
                sys.executable,
                "-c",
                "from flows.pipeline import pipeline; print(pipeline.to_deployment(name='ui-test').apply())",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert apply.returncode == 0, apply.stderr[-3000:]
        yield server, apply.stdout.strip().splitlines()[-1], tmp / "runs"


def test_stage_artifacts_render_with_their_pictures(ui_run, tmp_path):
    server, _, _ = ui_run
    runs = {r["name"].split("-")[0]: r for r in _post(server, "flow_runs/filter", {"limit": 50})}
    assert {"train", "reward", "pairs"} <= set(runs), sorted(runs)
    artifacts = _post(server, "artifacts/filter", {"limit": 200})
    by_suffix = {}
    for a in artifacts:
        for suffix in PICTURES:
            if (a.get("key") or "").endswith(suffix):
                by_suffix[suffix] = a
    assert set(by_suffix) == set(PICTURES), sorted(a.get("key") for a in artifacts)

    with chromium_page(1300, 1000) as page:
        # the train stage run's Artifacts tab lists its artifacts
        page.goto(server.ui(f"runs/flow-run/{runs['train']['id']}"))
        page.locator(".p-tab-navigation >> text=Artifacts").first.click()
        page.wait_for_selector("text=train-curve", timeout=30000)
        _shot(page, tmp_path, "run-artifacts-tab.png")
        # each picture artifact renders every image it holds
        for suffix, least in PICTURES.items():
            page.goto(server.ui(f"artifacts/artifact/{by_suffix[suffix]['id']}"))
            images = _wait_images(page, least)
            assert len(images) >= least and all(i["ok"] for i in images), (suffix, images)
            assert all(i["src"].startswith("data:image/svg+xml") for i in images), images
            _shot(page, tmp_path, f"artifact-{suffix}.png")


def test_the_deployment_form_shows_readable_descriptions(ui_run, tmp_path):
    server, deployment_id, _ = ui_run
    with chromium_page(1300, 1000) as page:
        page.goto(server.ui(f"deployments/deployment/{deployment_id}/run"))
        page.wait_for_selector("text=run root", timeout=60000)
        text = page.inner_text("body")
        _shot(page, tmp_path, "deployment-run-form.png")
    line = next(ln for ln in text.splitlines() if ln.startswith("run root"))
    assert "ROOT/STAGE/FINGERPRINT" in line and "///" not in text, line


def test_the_pipeline_run_links_its_html_report(ui_run, tmp_path):
    server, _, root = ui_run
    report = root / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    links = [
        a
        for a in _post(server, "artifacts/filter", {"limit": 200})
        if (a.get("key") or "").endswith("-report")
    ]
    assert links and report.as_uri() in links[0]["data"], links
    with chromium_page(1300, 1000) as page:
        page.goto(server.ui(f"artifacts/artifact/{links[0]['id']}"))
        page.wait_for_selector("text=report.html", timeout=30000)
        _shot(page, tmp_path, "artifact-report-link.png")
