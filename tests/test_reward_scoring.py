"""Guarantees of MetricScorer (dp2o.reward.scoring) with real pyiqa metrics that need no downloads."""

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

from dp2o.reward import MetricScorer, resolve_metrics

pytest.importorskip("pyiqa")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CHEAP = ["psnr", "ssim", "gmsd", "piqe"]


def _images(n=5, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(n, 3, size, size, generator=g)
    noise = torch.randn(n, 3, size, size, generator=g) * torch.linspace(0.02, 0.2, n).view(-1, 1, 1, 1)
    return (hr + noise).clamp(0, 1), hr


@pytest.fixture(scope="module")
def scorer():
    return MetricScorer(resolve_metrics(CHEAP), batch_size=4)


def test_fresh_machine_offline_preset_scores_and_paper_preset_fails_at_start_up(tmp_path):
    """With HF_HUB_OFFLINE=1 and an empty TORCH_HOME: 'offline' scores without creating any file, 'paper'
    raises MetricWeightsMissing naming the files and where they go before any metric is built, and a failed
    download (allow_download=True) is reported as MetricWeightsMissing too."""
    script = textwrap.dedent(
        """
        import json, os, torch
        from dp2o.reward import MetricScorer, MetricWeightsMissing, resolve_metrics
        torch.set_num_threads(1)
        result = {}
        try:
            MetricScorer(resolve_metrics("paper"))
        except MetricWeightsMissing as err:
            result["paper_error"] = str(err)
        try:
            MetricScorer(resolve_metrics("musiq"), allow_download=True)
        except MetricWeightsMissing as err:
            result["download_error"] = str(err)
        scorer = MetricScorer(resolve_metrics("offline"), batch_size=2)
        hr = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
        scores = scorer.score((hr + 0.05).clamp(0, 1), hr)
        result["scores"] = {k: v.tolist() for k, v in scores.items()}
        result["files"] = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.environ["TORCH_HOME"]) for f in fs)
        print(json.dumps(result))
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(REPO),
        # a proxy nobody listens on: downloads fail at once, with or without internet
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    message = result["paper_error"]
    assert os.path.join(str(tmp_path / "torch"), "hub", "pyiqa", "LPIPS_v0.1_alex-df73285e.pth") in message
    assert os.path.join(str(tmp_path / "torch"), "hub", "clip", "ViT-B-32.pt") in message
    assert "models--q-future--one-align" in message
    assert (
        "prefetch_weights('lpips,topiq_fr,afine_fr,maniqa,musiq,clipiqa_plus,topiq_nr,afine_nr,qalign')"
        in message
    )
    assert proc.stdout.count("Downloading") == 1  # 'paper' was refused before pyiqa tried to fetch anything

    # with downloads allowed, a failed download is reported the same way, with pyiqa's error attached
    assert "could not build metric 'musiq'" in result["download_error"]
    assert (
        os.path.join(str(tmp_path / "torch"), "hub", "pyiqa", "musiq_koniq_ckpt-e95806b9.pth")
        in result["download_error"]
    )

    assert set(result["scores"]) == {s.name for s in resolve_metrics("offline")}
    assert all(len(v) == 3 and all(np.isfinite(v)) for v in result["scores"].values())
    assert result["files"] == []


def test_scores_are_raw_float64_in_each_metrics_own_direction(scorer):
    sr, hr = _images()
    scores = scorer.score(sr, hr)
    assert set(scores) == set(CHEAP)
    for values in scores.values():
        assert values.dtype == np.float64 and values.shape == (5,)
    # noise grows along the batch: PSNR/SSIM fall, GMSD (lower is better) rises — no flipping here
    assert np.all(np.diff(scores["psnr"]) < 0)
    assert np.all(np.diff(scores["ssim"]) < 0)
    assert np.all(np.diff(scores["gmsd"]) > 0)
    perfect = scorer.score(hr, hr)
    assert np.all(perfect["psnr"] > scores["psnr"]) and np.all(perfect["gmsd"] == 0)


def test_every_metric_call_sees_exactly_batch_size_images_and_results_do_not_depend_on_chunking(scorer):
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
        for m in scorer.metrics.values()
    ]
    try:
        sr, hr = _images(n=5)
        together = scorer.score(sr, hr)
    finally:
        for h in hooks:
            h.remove()
    assert seen and set(seen) == {4}  # 5 images → chunks of 4 and 1 (+3 padding)
    alone = [scorer.score(sr[i : i + 1], hr[i : i + 1]) for i in range(5)]
    for name in CHEAP:
        np.testing.assert_array_equal(together[name], [a[name][0] for a in alone])


def test_inputs_are_not_modified(scorer):
    sr, hr = _images(n=3)
    sr0, hr0 = sr.clone(), hr.clone()
    scorer.score(sr, hr)
    assert torch.equal(sr, sr0) and torch.equal(hr, hr0)


@pytest.mark.parametrize(
    "sr, hr, match",
    [
        (torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32), r"\[B, 3, H, W\]"),
        (torch.rand(2, 3, 32, 32) * 2, torch.rand(2, 3, 32, 32), r"in \[0, 1\]"),
        (torch.rand(2, 3, 32, 32), torch.rand(3, 3, 32, 32), "differs from hr shape"),
        (torch.randint(0, 2, (2, 3, 32, 32)), torch.rand(2, 3, 32, 32), "float tensor"),
    ],
)
def test_bad_images_are_refused(scorer, sr, hr, match):
    with pytest.raises(ValueError, match=match):
        scorer.score(sr, hr)


def test_image_size_limits_come_from_the_registry():
    scorer = MetricScorer(resolve_metrics(["ms_ssim"]), batch_size=1)
    sr, hr = _images(n=1, size=64)
    with pytest.raises(ValueError, match="'ms_ssim' needs height and width >= 161"):
        scorer.score(sr, hr)


def test_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="at least one metric"):
        MetricScorer([])
    with pytest.raises(ValueError, match="batch_size"):
        MetricScorer(resolve_metrics("psnr"), batch_size=0)
