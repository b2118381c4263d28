"""C-FLUX backend on tiny real diffusers components: batched sampling equals the pipeline, flow DPO at ln 2."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_models_common import tiny_flux_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dp2o.models import BackendConfig, BackendError, build_backend  # noqa: E402
from dp2o.models._hf_common import upsample  # noqa: E402
from dp2o.train.losses import dpo_loss  # noqa: E402
from tests.helpers import assert_starts_at_ln2  # noqa: E402

torch.set_num_threads(1)
STEPS = 3


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return tiny_flux_folder(tmp_path_factory.mktemp("flux"))


def backend(model, controlnet, **kw):
    cn = None if controlnet is None else str(controlnet)
    cfg = BackendConfig(
        kind="flux-controlnet", model=str(model), controlnet=cn, num_inference_steps=STEPS, **kw
    )
    return build_backend(cfg)


def test_batched_rows_match_alone_and_the_diffusers_pipeline(flux):
    b = backend(*flux, prompt="a photo")
    assert b.prediction_type == "flow"
    lr = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = b.sample(lr, seeds=[11, 12, 13], prompts=["a photo", "a photo", "a dog"])
    assert out.shape == (3, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert (out[0] - out[1]).abs().max() > 1e-3
    torch.testing.assert_close(b.sample(lr[1:2], seeds=[12]), out[1:2], atol=1e-5, rtol=0)
    ref = b.pipeline(
        prompt="a dog",
        control_image=2 * upsample(lr[2:3], 4) - 1,
        height=32,
        width=32,
        num_inference_steps=STEPS,
        guidance_scale=2.5,
        generator=torch.Generator().manual_seed(13),
        output_type="pt",
    ).images
    torch.testing.assert_close(ref, out[2:3], atol=1e-5, rtol=0)


def test_controlnet_from_single_file_or_fresh(flux, tmp_path):
    model, folder = flux
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    save_file(state, str(tmp_path / "cn.safetensors"))
    lr = torch.rand(1, 3, 8, 8)
    from_file = backend(model, tmp_path / "cn.safetensors").sample(lr, [1])
    torch.testing.assert_close(from_file, backend(model, folder).sample(lr, [1]))
    save_file(
        {k: v for k, v in state.items() if k != "controlnet_x_embedder.weight"},
        str(tmp_path / "bad.safetensors"),
    )
    with pytest.raises(BackendError, match=r"bad\.safetensors.*1 missing"):
        backend(model, tmp_path / "bad.safetensors")
    fresh = backend(model, None)
    assert (fresh.controlnet.config.num_layers, fresh.controlnet.config.num_single_layers) == (4, 0)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_one_flow_dpo_step_starts_at_ln2_and_moves_only_the_policy(flux, tmp_path, lora_rank):
    b = backend(*flux, lora_rank=lora_rank)
    b.train()
    n = 2
    lr = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    targets = torch.rand(2 * n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    batch = b.make_noised_batch(targets, torch.cat([lr, lr]), torch.Generator().manual_seed(4))
    assert batch.t.is_floating_point() and batch.t.min() > 0 and batch.t.max() < 1
    torch.testing.assert_close(batch.cond.control[:n], batch.cond.control[n:], atol=0, rtol=0)
    err, err_ref = b.prediction_errors(batch)
    loss, _ = dpo_loss(err[:n], err_ref[:n], err[n:], err_ref[n:], beta=1000.0)
    assert_starts_at_ln2(loss, err, err_ref, beta=1000.0)
    loss.backward()
    params = b.trainable_parameters()
    assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0
    torch.optim.SGD(params, lr=1.0).step()
    err2, err_ref2 = b.prediction_errors(batch)
    torch.testing.assert_close(err_ref2, err_ref, atol=0, rtol=0)
    assert (err2 - err).abs().max() > 1e-7
    b.save_trainable(tmp_path / "ckpt")
    restored = backend(*flux, lora_rank=lora_rank)
    restored.load_trainable(tmp_path / "ckpt")
    torch.testing.assert_close(restored.prediction_errors(batch)[0], err2.detach(), atol=1e-6, rtol=0)


def test_training_target_is_the_velocity_at_the_interpolated_point(flux):
    b = backend(*flux)
    lr = torch.rand(1, 3, 8, 8)
    batch = b.make_noised_batch(torch.rand(1, 3, 32, 32), lr, torch.Generator().manual_seed(9))
    _, err_ref = b.prediction_errors(batch)
    sigma = batch.t.view(-1, 1, 1, 1)
    x_t = b._pack((1 - sigma) * batch.x0 + sigma * batch.noise)
    img_ids, txt_ids = b._ids(1, 32, 32, batch.cond.text.shape[1])
    with b._trainable.as_reference() as ref:
        pred = b._velocity(x_t, batch.t, batch.cond, img_ids, txt_ids, b.transformer, ref)
    velocity = b._pack(batch.noise - batch.x0)
    assert err_ref.item() == pytest.approx((pred - velocity).pow(2).mean().item(), rel=1e-5)
    assert err_ref.item() != pytest.approx((pred - b._pack(batch.noise)).pow(2).mean().item(), rel=1e-3)


def test_timestep_range_squeezes_sigma_and_the_full_range_leaves_it_alone(flux):
    b = backend(*flux)
    lr, target = torch.rand(8, 3, 8, 8), torch.rand(8, 3, 32, 32)
    full = b.make_noised_batch(target, lr, torch.Generator().manual_seed(3))
    same = b.make_noised_batch(target, lr, torch.Generator().manual_seed(3), t_range=(0.0, 1.0))
    low = b.make_noised_batch(target, lr, torch.Generator().manual_seed(3), t_range=(0.0, 0.3))
    assert torch.equal(full.t, same.t)
    assert low.t.max() <= 0.3 and low.t.min() >= 0.0
    torch.testing.assert_close(low.t, 0.3 * full.t)
