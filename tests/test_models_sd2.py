"""C-SD2 backend on tiny real diffusers components: batched sampling equals the pipeline, DPO starts at ln 2."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_models_common import tiny_sd2_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dp2o.models import BackendConfig, BackendError, build_backend  # noqa: E402
from dp2o.models._hf_common import upsample  # noqa: E402
from dp2o.train.losses import dpo_loss  # noqa: E402
from tests.helpers import assert_starts_at_ln2  # noqa: E402

torch.set_num_threads(1)
STEPS = 3


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return tiny_sd2_folder(tmp_path_factory.mktemp("sd2"))


def backend(model, controlnet, **kw):
    cfg = BackendConfig(
        kind="sd2-controlnet", model=str(model), controlnet=str(controlnet), num_inference_steps=STEPS, **kw
    )
    return build_backend(cfg)


def lr_images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def test_batched_rows_match_alone_and_the_diffusers_pipeline(sd2):
    b = backend(*sd2, prompt="a photo")
    lr = lr_images()
    rows = torch.cat([lr, lr])
    out = b.sample(rows, seeds=[10, 10, 11, 12], prompts=["a photo", "a photo", "a photo", "a cat"])
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert (out[0] - out[2]).abs().max() > 1e-3, "different seeds must give different candidates"
    alone = b.sample(rows[2:3], seeds=[11])
    torch.testing.assert_close(alone, out[2:3], atol=1e-5, rtol=0)
    ref = b.pipeline(
        prompt="a cat",
        negative_prompt="dotted, noise, blur, lowres, smooth",
        image=upsample(rows[3:4], 4),
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(12),
        output_type="pt",
    ).images
    torch.testing.assert_close(ref, out[3:4], atol=1e-5, rtol=0)
    assert len(b._text) == 3, "one text-encoder call per distinct prompt (two prompts + the negative)"


def test_single_file_controlnet_equals_folder_and_bad_keys_name_the_file(sd2, tmp_path):
    model, cn_folder = sd2
    state = load_file(str(cn_folder / "diffusion_pytorch_model.safetensors"))
    good = tmp_path / "cn.safetensors"
    save_file(state, str(good))
    lr = lr_images(1)
    torch.testing.assert_close(
        backend(model, good).sample(lr, [3]), backend(model, cn_folder).sample(lr, [3])
    )

    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if "mid_block" not in k}, str(missing))
    with pytest.raises(BackendError, match=r"missing\.safetensors.*missing"):
        backend(model, missing)
    extra = tmp_path / "extra.safetensors"
    save_file({**state, "bogus.weight": torch.zeros(1)}, str(extra))
    with pytest.raises(BackendError, match=r"extra\.safetensors.*unexpected"):
        backend(model, extra)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_one_dpo_step_starts_at_ln2_and_moves_only_the_policy(sd2, tmp_path, lora_rank):
    b = backend(*sd2, lora_rank=lora_rank)
    b.train()
    n = 2
    lr = lr_images(n)
    targets = torch.rand(2 * n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = b.make_noised_batch(targets, torch.cat([lr, lr]), torch.Generator().manual_seed(5))
    assert batch.t.dtype == torch.int64 and batch.x0.shape == (2 * n, 4, 16, 16)
    torch.testing.assert_close(batch.cond.control[:n], batch.cond.control[n:], atol=0, rtol=0)
    err, err_ref = b.prediction_errors(batch)
    assert err_ref.grad_fn is None and err.grad_fn is not None
    loss, logs = dpo_loss(err[:n], err_ref[:n], err[n:], err_ref[n:], beta=5000.0)
    assert_starts_at_ln2(loss, err, err_ref, beta=5000.0)
    loss.backward()
    params = list(b.trainable_parameters())
    assert all(p.dtype == torch.float32 for p in params)
    if lora_rank:
        assert all("lora_" in name for name, p in b.controlnet.named_parameters() if p.requires_grad)
    assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0
    torch.optim.SGD(params, lr=1.0 if lora_rank else 1e-2).step()
    err2, err_ref2 = b.prediction_errors(batch)
    torch.testing.assert_close(err_ref2, err_ref, rtol=0, atol=0)
    assert (err2 - err).abs().max() > 1e-7, "the update must change the policy"

    b.save_trainable(tmp_path / "ckpt")
    restored = backend(*sd2, lora_rank=lora_rank)
    restored.load_trainable(tmp_path / "ckpt")
    err3, err_ref3 = restored.prediction_errors(batch)
    torch.testing.assert_close(err3, err2.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(err_ref3, err_ref, atol=1e-6, rtol=0)
    with pytest.raises(BackendError, match=f"saved with lora_rank={lora_rank}"):
        backend(*sd2, lora_rank=0 if lora_rank else 4).load_trainable(tmp_path / "ckpt")


def test_v_prediction_base_trains_against_velocity(tmp_path):
    model, cn = tiny_sd2_folder(tmp_path, prediction_type="v_prediction")
    b = backend(model, cn)
    assert b.prediction_type == "v_prediction"
    lr = lr_images(1)
    batch = b.make_noised_batch(torch.rand(1, 3, 32, 32), lr, torch.Generator().manual_seed(0))
    _, err_ref = b.prediction_errors(batch)
    with b._trainable.as_reference() as ref:
        noisy = b._noiser.add_noise(batch.x0, batch.noise, batch.t)
        pred = b._denoise(noisy, batch.t, batch.cond.text, batch.cond.control, b.unet, ref)
    velocity = b._noiser.get_velocity(batch.x0, batch.noise, batch.t)
    assert err_ref.item() == pytest.approx((pred - velocity).pow(2).mean().item(), rel=1e-5)
    assert err_ref.item() != pytest.approx((pred - batch.noise).pow(2).mean().item(), rel=1e-3)


def test_mixed_precision_keeps_fp32_trainables_and_starts_at_ln2(sd2):
    b = backend(*sd2, dtype="bfloat16")
    assert b.unet.dtype == torch.bfloat16
    b.train()
    assert {p.dtype for p in b.trainable_parameters()} == {torch.float32}
    lr = lr_images(2)
    batch = b.make_noised_batch(torch.rand(2, 3, 32, 32), lr, torch.Generator().manual_seed(0))
    err, ref = b.prediction_errors(batch)
    loss, _ = dpo_loss(err[:1], ref[:1], err[1:], ref[1:], beta=5000.0)
    assert_starts_at_ln2(loss, err, ref, beta=5000.0)
    assert b.sample(lr[:1], [0]).dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients(sd2):
    grads = []
    for checkpointing in (False, True):
        b = backend(*sd2, gradient_checkpointing=checkpointing)
        b.train()
        targets = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        batch = b.make_noised_batch(targets, lr_images(2), torch.Generator().manual_seed(0))
        err, _ = b.prediction_errors(batch)
        err.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in b.trainable_parameters() if p.grad is not None]))
    assert b.controlnet.is_gradient_checkpointing
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


class _Images:
    """In-memory stand-in for `dp2o.train.data.PairImages`: seeded candidates and LR per sample id."""

    def candidates(self, sample_ids, candidate_ids) -> torch.Tensor:
        return torch.stack(
            [
                torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(100 * int(s[-1]) + int(c)))
                for s, c in zip(sample_ids, candidate_ids, strict=True)
            ]
        )

    def lr(self, sample_ids) -> torch.Tensor:
        return torch.stack([lr_images(4)[int(s[-1])] for s in sample_ids])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_loop_starts_at_ln2_and_resumes_exactly(sd2, tmp_path, dtype):
    import pyarrow as pa

    from dp2o.config import TrainConfig
    from dp2o.storage import Storage
    from dp2o.train.loop import train_dpo

    pairs = pa.table({"sample_id": ["s0", "s1", "s2", "s3"], "win": [0, 1, 2, 3], "lose": [4, 5, 6, 7]})
    cfg = TrainConfig(steps=3, pairs_per_step=2, micro_batch=2, learning_rate=1e-3, checkpoint_every=2)
    out = Storage(str(tmp_path / "run"))
    first = train_dpo(backend(*sd2, dtype=dtype), pairs, _Images(), cfg, out, log=lambda _: None)
    losses = first.metrics["loss"].to_pylist()
    # policy == reference up to float rounding, which the β = 5000 margin magnifies to ~1e-4 at most
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert abs(losses[2] - math.log(2)) > 1e-3, "two updates must move the policy away from the reference"

    # a fresh backend resumes from the step-2 checkpoint (weights, Adam state) and repeats step 3 exactly
    resumed = train_dpo(backend(*sd2, dtype=dtype), pairs, _Images(), cfg, out, log=lambda _: None)
    assert resumed.stats["resumed_from"] == 2
    assert resumed.metrics["loss"].to_pylist()[2] == pytest.approx(losses[2], abs=1e-6)
