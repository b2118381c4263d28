"""SD x4 upscaler backend on tiny real diffusers components: batched sampling equals the pipeline, DPO at ln 2."""

from __future__ import annotations

import os

import pytest
import torch

from tests.test_models_common import tiny_upscaler_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dp2o.models import BackendConfig, build_backend  # noqa: E402
from dp2o.train.losses import dpo_loss  # noqa: E402
from tests.helpers import assert_starts_at_ln2  # noqa: E402

torch.set_num_threads(1)
STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_upscaler_folder(tmp_path_factory.mktemp("up"))


def backend(folder, **kw):
    return build_backend(
        BackendConfig(kind="sd-x4-upscaler", model=str(folder), num_inference_steps=STEPS, **kw)
    )


def test_batched_rows_match_alone_and_the_diffusers_pipeline(folder):
    b = backend(folder, prompt="a photo")
    assert (b.prediction_type, b.scale, type(b._sampler).__name__) == ("v_prediction", 4, "DDIMScheduler")
    lr = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    out = b.sample(lr, seeds=[4, 5, 6], prompts=["a photo", "a photo", "a cat"])
    assert out.shape == (3, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert (out[0] - out[1]).abs().max() > 1e-3
    torch.testing.assert_close(b.sample(lr[1:2], seeds=[5]), out[1:2], atol=1e-5, rtol=0)
    ref = b.pipeline(
        prompt="a cat",
        image=lr[2:3],
        num_inference_steps=STEPS,
        guidance_scale=9.0,
        generator=torch.Generator().manual_seed(6),
        output_type="pt",
    ).images
    torch.testing.assert_close(ref, out[2:3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_one_dpo_step_starts_at_ln2_and_trains_the_unet(folder, lora_rank):
    b = backend(folder, lora_rank=lora_rank)
    b.train()
    lr = torch.rand(1, 3, 8, 8)
    batch = b.make_noised_batch(
        torch.rand(2, 3, 32, 32), torch.cat([lr, lr]), torch.Generator().manual_seed(0)
    )
    assert batch.x0.shape == (2, 4, 8, 8)
    # winner and loser share the LR, so they must share its noised version (the condition)
    torch.testing.assert_close(batch.cond.image[0], batch.cond.image[1], atol=0, rtol=0)
    assert (batch.cond.image[0] - (2 * lr[0] - 1)).abs().max() > 1e-3, "the LR is noised to the noise level"
    err, ref = b.prediction_errors(batch)
    loss, _ = dpo_loss(err[:1], ref[:1], err[1:], ref[1:], beta=5000.0)
    assert_starts_at_ln2(loss, err, ref, beta=5000.0)
    loss.backward()
    params = b.trainable_parameters()
    assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0
    torch.optim.SGD(params, lr=1.0).step()
    err2, ref2 = b.prediction_errors(batch)
    torch.testing.assert_close(ref2, ref, atol=0, rtol=0)
    assert (err2 - err).abs().max() > 1e-7
