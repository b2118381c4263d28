"""The degradation chain: batch-independent bytes, regeneration from a stored row, and the ops' contracts."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dp2o.degrade import (
    DegradationConfig,
    DegradationParams,
    degrade_batch,
    min_hr_side,
    ops,
    params_arrow_fields,
    sample_params,
)
from dp2o.degrade.kernels import gaussian_1d, gaussian_family_kernel, sinc_kernel
from dp2o.degrade.params import KernelParams
from dp2o.degrade.pipeline import kernel_array, usm_kernel
from dp2o.seeding import torch_generator

CFG = DegradationConfig()
SIZE = 96


def _photo_batch(n: int, size: int = SIZE) -> torch.Tensor:
    """Smooth, photo-like uint8 images [n, 3, size, size] with edges (so blur, noise and JPEG all matter)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        f = torch.rand(3, 2, generator=g) * 12
        img = torch.stack([torch.sin(f[c, 0] * xx + f[c, 1] * yy) for c in range(3)]) * 0.4 + 0.5
        img[:, size // 3 : size // 2, size // 4 :] = torch.rand(3, 1, 1, generator=g)
        out.append((img * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


def _varied_params(n: int) -> list[DegradationParams]:
    """Params for n samples that differ in kernel kind, resize and noise kind (found by scanning seeds)."""
    chosen, kinds = [], set()
    for seed in range(500):
        p = sample_params(CFG, seed)
        key = (p.first.blur.kind, p.first.noise, p.first.resize_mode, p.final_jpeg_last)
        if key not in kinds:
            kinds.add(key)
            chosen.append(p)
        if len(chosen) == n:
            return chosen
    raise AssertionError("not enough variety in 500 seeds")


def test_a_samples_bytes_do_not_depend_on_its_batch():
    hr = _photo_batch(4)
    params = _varied_params(4)
    target, lr = degrade_batch(hr, params, CFG)
    assert target.shape == hr.shape and target.dtype == torch.uint8
    assert lr.shape == (4, 3, SIZE // 4, SIZE // 4) and lr.dtype == torch.uint8
    for i in range(4):
        t1, l1 = degrade_batch(hr[i : i + 1], params[i : i + 1], CFG)
        assert torch.equal(l1[0], lr[i]) and torch.equal(t1[0], target[i])
    order = [3, 1, 0]
    _, l3 = degrade_batch(hr[order], [params[i] for i in order], CFG)
    assert all(torch.equal(l3[j], lr[i]) for j, i in enumerate(order))


def test_lr_is_regenerated_byte_for_byte_from_its_parquet_row(tmp_path):
    hr = _photo_batch(3)
    params = _varied_params(3)
    _, lr = degrade_batch(hr, params, CFG)
    table = pa.Table.from_pylist([p.to_row() for p in params], schema=pa.schema(params_arrow_fields()))
    pq.write_table(table, tmp_path / "params.parquet")
    back = [DegradationParams.from_row(r) for r in pq.read_table(tmp_path / "params.parquet").to_pylist()]
    _, again = degrade_batch(hr, back, CFG)
    assert torch.equal(again, lr)


def test_degradation_actually_degrades_and_the_target_is_sharpened():
    hr = _photo_batch(2)
    params = _varied_params(2)
    target, lr = degrade_batch(hr, params, CFG)
    assert not torch.equal(target, hr)  # USM-sharpened target by default
    plain, lr_plain = degrade_batch(hr, params, CFG.model_copy(update={"usm_sharpen_hr": False}))
    assert torch.equal(plain, hr) and torch.equal(lr_plain, lr)  # the target knob does not touch the LR
    _, lr_unsharp_input = degrade_batch(hr, params, CFG.model_copy(update={"usm_sharpen_input": False}))
    assert not torch.equal(lr_unsharp_input, lr)
    # the LR is not just a downscale of the HR: noise/blur/JPEG move it away from a clean bicubic downscale
    clean = torch.nn.functional.interpolate(hr.float(), scale_factor=0.25, mode="area")
    assert (lr.float() - clean).abs().mean() > 1.0


def test_second_round_can_be_skipped_and_then_the_first_rounds_jpeg_is_the_last():
    cfg = DegradationConfig(second_order_prob=0.0)
    p = sample_params(cfg, 5)
    assert p.second is None
    hr = _photo_batch(1)
    _, lr = degrade_batch(hr, [p], cfg)
    assert lr.shape == (1, 3, SIZE // 4, SIZE // 4)


@pytest.mark.parametrize(
    ("hr", "message"),
    [
        (torch.zeros(1, 3, 96, 98, dtype=torch.uint8), "multiple of scale"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "too small"),
        (torch.zeros(1, 3, 96, 96), "uint8"),
        (torch.zeros(3, 96, 96, dtype=torch.uint8), "uint8"),
    ],
)
def test_bad_input_is_refused_with_a_reason(hr, message):
    with pytest.raises(ValueError, match=message):
        degrade_batch(hr, [sample_params(CFG, 0)] * max(1, hr.shape[0] if hr.ndim == 4 else 1), CFG)


def test_param_count_must_match_batch():
    with pytest.raises(ValueError, match="2 parameter sets for a batch of 1"):
        degrade_batch(_photo_batch(1), [sample_params(CFG, 0)] * 2, CFG)


def test_min_hr_side_is_the_true_limit():
    side = min_hr_side(CFG)
    assert side % 4 == 0 and 64 < side <= 96
    # the worst case (strongest first-round downscale, then a 21-tap second-round blur) runs at that size
    worst = sample_params(CFG, 0)
    first = worst.first.__class__(**{**worst.first.__dict__, "resize": "down", "resize_scale": 0.15})
    blur21 = KernelParams("aniso", 21, sigma_x=1.0, sigma_y=1.2, theta=0.3)
    second = worst.second.__class__(**{**worst.second.__dict__, "blur": blur21})
    worst = DegradationParams(first, second, KernelParams("sinc", 21, omega=1.0), "bicubic", True)
    degrade_batch(torch.full((1, 3, side, side), 128, dtype=torch.uint8), [worst], CFG)


# ---- ops -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
)
def test_gaussian_family_kernels_are_normalised_and_point_symmetric(kind):
    k = gaussian_family_kernel(kind, 15, 2.0, 0.7, 0.4, 1.5)
    assert k.shape == (15, 15) and math.isclose(k.sum(), 1.0) and (k >= 0).all()
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)
    assert k.argmax() == 15 * 7 + 7


def test_iso_kernel_is_the_outer_product_of_its_1d_factor():
    g = gaussian_1d(13, 1.7)
    np.testing.assert_allclose(
        np.outer(g, g), gaussian_family_kernel("iso", 13, 1.7, 9.0, 1.0, None), atol=1e-15
    )


def test_fft_filter_equals_direct_reflect_padded_correlation():
    img = _photo_batch(1).float() / 255
    rng = np.random.default_rng(0)
    for k in (7, 21, 51):
        kernel = torch.from_numpy(rng.random((k, k)).astype(np.float32))
        kernel /= kernel.sum()
        padded = torch.nn.functional.pad(img[0][:, None], (k // 2,) * 4, mode="reflect")
        direct = torch.nn.functional.conv2d(padded, kernel[None, None])[:, 0][None]
        assert (ops.filter2d(img, kernel) - direct).abs().max() < 1e-5
    # an asymmetric kernel catches a flipped (convolution instead of correlation) implementation
    shift = torch.zeros(3, 3)
    shift[1, 2] = 1.0
    assert torch.allclose(ops.filter2d(img, shift)[..., :-1], img[..., 1:], atol=1e-6)


def test_anisotropic_kernel_is_rotated():
    k = gaussian_family_kernel("aniso", 21, 4.0, 0.5, 0.0, None)
    assert k[10, :].sum() > 5 * k[:, 10].sum()  # long along x at theta = 0
    k90 = gaussian_family_kernel("aniso", 21, 4.0, 0.5, math.pi / 2, None)
    np.testing.assert_allclose(k90, k.T, atol=1e-12)


def test_sinc_kernel_center_and_low_pass():
    k = sinc_kernel(21, math.pi / 2)
    assert math.isclose(k.sum(), 1.0) and k[10, 10] == k.max()
    assert (k < 0).any()  # ringing lobes: this is a sinc, not a Gaussian
    # pi is the Nyquist cutoff: the kernel is then (almost) a delta
    assert sinc_kernel(7, math.pi)[3, 3] > 0.75


def test_kernel_array_dispatch():
    assert kernel_array(KernelParams("sinc", 9, omega=2.0)).shape == (9, 9)
    with pytest.raises(ValueError, match="unknown"):
        gaussian_family_kernel("box", 9, 1, 1, 0, None)


def test_gaussian_noise_level_and_gray_noise_is_shared_by_channels():
    img = torch.full((1, 3, 64, 64), 0.5)
    colour = ops.add_gaussian_noise(img, 20.0, False, torch_generator(1)) - img
    assert abs(float(colour.std()) * 255 - 20.0) < 1.0
    assert not torch.equal(colour[:, 0], colour[:, 1])
    gray = ops.add_gaussian_noise(img, 20.0, True, torch_generator(1)) - img
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert torch.equal(ops.add_gaussian_noise(img, 20.0, False, torch_generator(1)) - img, colour)


def test_poisson_noise_grows_with_brightness_and_scale():
    # a ramp over all 256 levels, so the photon count per level is 256 as for a real photo
    img = torch.linspace(0, 1, 256).repeat(1, 3, 64, 1)
    dark, bright = slice(20, 60), slice(180, 220)
    n1 = ops.add_poisson_noise(img, 1.0, False, torch_generator(2)) - img
    assert n1[..., bright].std() > 1.5 * n1[..., dark].std() > 0
    n2 = ops.add_poisson_noise(img, 2.0, False, torch_generator(2)) - img
    assert 1.8 < float(n2[..., bright].std() / n1[..., bright].std()) < 2.2
    gray = ops.add_poisson_noise(img, 1.0, True, torch_generator(2)) - img
    assert torch.equal(gray[:, 0], gray[:, 2])


def test_jpeg_error_grows_as_quality_drops_and_keeps_shape():
    img = _photo_batch(1, 77)[:, :, :, :70].float() / 255  # not a multiple of 16: padding path
    errs = [float((ops.jpeg(img, q) - img).abs().mean()) for q in (95, 75, 50, 30)]
    assert ops.jpeg(img, 50).shape == img.shape
    assert errs == sorted(errs) and errs[-1] > 2 * errs[0]
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert (ops.jpeg(flat, 30) - flat).abs().max() < 1.5 / 255  # a flat block survives any quality


def test_usm_sharpens_edges_and_leaves_flat_areas():
    img = torch.full((1, 3, 64, 64), 0.3)
    img[..., 32:] = 0.7
    g = usm_kernel(CFG)
    out = ops.usm_sharpen(img, g, 0.5, 10)
    assert out[0, 0, 10, 31] < 0.3 - 0.01 and out[0, 0, 10, 32] > 0.7 + 0.01  # overshoot at the edge
    flat = torch.full((1, 3, 64, 64), 0.4)
    assert torch.equal(ops.usm_sharpen(flat, g, 0.5, 10), flat)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_gpu_agree_within_float_tolerance():
    hr = _photo_batch(4, 128)
    params = _varied_params(4)
    _, cpu = degrade_batch(hr, params, CFG, device="cpu")
    _, gpu = degrade_batch(hr, params, CFG, device="cuda")
    diff = (cpu.int() - gpu.int()).abs().float()
    assert diff.mean() < 0.5 and (diff > 0).float().mean() < 0.2


def test_poisson_field_is_robust_to_a_last_bit_change_of_one_rate():
    # CPU and GPU compute rates that can differ in the last bit; only that pixel may then change
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[0, 0, 0, 0] = torch.nextafter(y[0, 0, 0, 0], torch.tensor(2.0))
    a = ops.add_poisson_noise(x, 1.0, False, torch_generator(4))
    b = ops.add_poisson_noise(y, 1.0, False, torch_generator(4))
    assert int((a != b).sum()) <= 1


def test_threads_running_concurrently_give_the_same_bytes():
    from concurrent.futures import ThreadPoolExecutor

    hr, params = _photo_batch(2), _varied_params(2)
    _, serial = degrade_batch(hr, params, CFG)
    with ThreadPoolExecutor(max_workers=2) as pool:
        outs = list(pool.map(lambda i: degrade_batch(hr[i : i + 1], params[i : i + 1], CFG)[1], [0, 1, 0, 1]))
    assert all(torch.equal(out[0], serial[i % 2]) for i, out in enumerate(outs))
