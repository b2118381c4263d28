"""Our degradation ops against BasicSR 1.4.2's, with identical explicit parameters (skipped without basicsr).

Install basicsr outside the project (`pip install --no-deps --target DIR basicsr==1.4.2`) and run these with
PYTHONPATH=DIR. The full comparison, with distributions, is `python -m benchmarks.degrade_fidelity`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.degrade_reference import basicsr_chain_with_params, basicsr_kernel, crops, import_basicsr
from dp2o.degrade import DegradationConfig, degrade_batch, ops, sample_params
from dp2o.degrade.pipeline import blur, kernel_array, usm_kernel
from dp2o.seeding import derive_seed, torch_generator

BS = import_basicsr()
pytestmark = pytest.mark.skipif(BS is None, reason="basicsr==1.4.2 not importable (put it on PYTHONPATH)")
CFG = DegradationConfig()


@pytest.fixture(scope="module")
def hr():
    return crops(8, 128, seed=0)


@pytest.fixture(scope="module")
def params():
    return [sample_params(CFG, derive_seed(1, "fidelity-test", i)) for i in range(80)]


def test_kernels_equal_basicsr(params):
    kernels = [
        k for p in params for k in (p.first.blur, p.second.blur if p.second else None, p.final_sinc) if k
    ]
    assert {k.kind for k in kernels} >= {"iso", "aniso", "generalized_iso", "plateau_iso", "sinc"}
    for k in kernels:
        np.testing.assert_allclose(kernel_array(k), basicsr_kernel(BS, k, k.size), rtol=0, atol=1e-12)


def test_blur_usm_noise_and_jpeg_match_basicsr(hr, params):
    img = hr[:1].float() / 255
    with torch.no_grad():
        for p in params[:10]:
            k = p.first.blur
            ref = BS.filter2D(img, torch.FloatTensor(basicsr_kernel(BS, k))[None])
            assert (blur(img, k) - ref).abs().max() < 1e-5
        g = usm_kernel(CFG)
        assert (ops.usm_sharpen(img, g, 0.5, 10) - BS.USMSharp()(img)).abs().max() < 1e-5
        d = BS.degradations
        for gray in (False, True):
            torch.manual_seed(9)
            ref = d.add_gaussian_noise_pt(img, sigma=12.0, gray_noise=float(gray), clip=True, rounds=False)
            assert (ops.add_gaussian_noise(img, 12.0, gray, torch_generator(9)) - ref).abs().max() < 1e-6
            # Poisson fields differ by design (inverse CDF vs torch.poisson); their spread must not
            ramp = torch.linspace(0, 1, 256).repeat(1, 3, 128, 1)
            torch.manual_seed(9)
            ref = (
                d.add_poisson_noise_pt(ramp, scale=2.0, gray_noise=float(gray), clip=True, rounds=False)
                - ramp
            )
            ours = ops.add_poisson_noise(ramp, 2.0, gray, torch_generator(9)) - ramp
            assert (
                abs(float(ours.std() / ref.std()) - 1) < 0.03 and abs(float(ours.mean() - ref.mean())) < 1e-3
            )
        jpeger = BS.DiffJPEG(differentiable=False)
        for q, size in [(30.0, (128, 128)), (57.3, (77, 101)), (95.0, (64, 48))]:
            x = img[..., : size[0], : size[1]].contiguous()
            assert ((ops.jpeg(x, q) - jpeger(x, quality=torch.tensor([q]))).abs() * 255).max() < 0.5


def test_whole_chain_matches_basicsr_ops_with_the_same_parameters(hr, params):
    gaussian = [p for p in params if p.first.noise == "gaussian" and p.second.noise == "gaussian"]
    identical, mean_abs = 0, []
    for i in range(len(hr)):
        _, ours = degrade_batch(hr[i : i + 1], [gaussian[i]], CFG)
        _, ref = basicsr_chain_with_params(BS, hr[i : i + 1], gaussian[i], CFG)
        diff = (ours.int() - ref.int()).abs().float()
        identical += int(diff.max() == 0)
        mean_abs.append(float(diff.mean()))
    # float rounding can flip a JPEG coefficient in a few blocks; everything else is byte-identical
    assert identical >= len(hr) // 2 and max(mean_abs) < 0.2
