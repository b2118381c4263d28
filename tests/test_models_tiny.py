"""The built-in tiny backend: loading, seed-determinism of candidates, the training contract, bundled weights."""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread also makes policy and reference forwards bit-identical: with several, the two copies can take
# kernels that differ in the last bit, which β = 5000 turns into a ~1e-4 deviation from ln 2.
torch.set_num_threads(1)

from dp2o.models import BackendConfig, BackendError, build_backend  # noqa: E402
from dp2o.models.tiny import TinyBackend, bundled_weights_dir  # noqa: E402
from dp2o.train.losses import dpo_loss  # noqa: E402
from tests.helpers import assert_starts_at_ln2  # noqa: E402

#: three levels (downsampling factor 4) and narrow channels, so a test model builds and runs in milliseconds
SMALL_UNET = {
    "block_out_channels": (8, 16, 16),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model = TinyBackend.from_random(seed=3, unet_config=SMALL_UNET, num_inference_steps=3)
    model.residual_clip = 0.5
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def backend(saved_folder):
    return build_backend(BackendConfig(kind="tiny", model=str(saved_folder)))


def _lr(n=2, h=8, w=8, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_round_trip_through_build_backend_keeps_weights_and_steps(saved_folder, backend):
    original = TinyBackend.from_random(seed=3, unet_config=SMALL_UNET)
    for (name, a), b in zip(
        original.unet.state_dict().items(), backend.unet.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert backend.num_inference_steps == 3
    assert backend.residual_clip == 0.5 and backend.sampler.config.clip_sample_range == 0.5
    overridden = build_backend(BackendConfig(kind="tiny", model=str(saved_folder), num_inference_steps=5))
    assert overridden.num_inference_steps == 5


def test_seeds_give_different_candidates_and_a_row_regenerates_alone(backend):
    lr = _lr(1).repeat(3, 1, 1, 1)
    out = backend.sample(lr, seeds=[11, 12, 11])
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert (out[0] - out[1]).abs().mean() > 1e-3, "different seeds must give different candidates"
    torch.testing.assert_close(out[0], out[2], atol=1e-4, rtol=0)
    alone = backend.sample(lr[1:2], seeds=[12])
    torch.testing.assert_close(alone[0], out[1], atol=1e-4, rtol=0)


def test_sizes_not_divisible_by_the_unet_factor_are_padded_and_cropped():
    lr = _lr(1, h=5, w=7)  # HR 20×28: not a multiple of 8, the factor of a 4-level UNet
    deeper = TinyBackend.from_random(
        seed=0,
        unet_config={
            **SMALL_UNET,
            "block_out_channels": (8, 8, 16, 16),
            "down_block_types": ("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
            "up_block_types": ("AttnUpBlock2D",) + ("UpBlock2D",) * 3,
        },
        num_inference_steps=2,
    )
    assert deeper.factor == 8
    out = deeper.sample(lr, seeds=[0])
    assert out.shape == (1, 3, 20, 28) and torch.isfinite(out).all()


def test_dpo_loss_is_ln2_before_the_first_update_and_moves_after_one():
    policy = TinyBackend.from_random(seed=1, unet_config=SMALL_UNET)
    lr = _lr(2)
    win, lose = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    bw = policy.make_noised_batch(win, lr, gen)
    bl = type(bw)(x0=policy.make_noised_batch(lose, lr, gen).x0, noise=bw.noise, t=bw.t, cond=bw.cond)
    policy.train()
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1e-6)
    (ew, rw), (el, rl) = policy.prediction_errors(bw), policy.prediction_errors(bl)
    assert not rw.requires_grad and ew.requires_grad
    loss, logs = dpo_loss(ew, rw, el, rl, beta=5000.0)
    assert_starts_at_ln2(loss, torch.cat([ew, el]), torch.cat([rw, rl]), beta=5000.0)
    loss.backward()
    opt.step()
    (ew2, rw2), (el2, rl2) = policy.prediction_errors(bw), policy.prediction_errors(bl)
    torch.testing.assert_close(rw2, rw, msg="the reference must stay frozen")
    assert dpo_loss(ew2, rw2, el2, rl2, beta=5000.0)[0].item() < math.log(2)


def test_make_noised_batch_draws_everything_from_the_generator(backend):
    target, lr = torch.rand(3, 3, 32, 32), _lr(3)
    a = backend.make_noised_batch(target, lr, torch.Generator().manual_seed(5))
    b = backend.make_noised_batch(target, lr, torch.Generator().manual_seed(5))
    assert torch.equal(a.t, b.t) and torch.equal(a.noise, b.noise)
    assert a.t.shape == (3,) and a.t.min() >= 0 and a.t.max() < 1000
    with pytest.raises(ValueError, match="upscaled"):
        backend.make_noised_batch(target, _lr(3, h=4, w=4), torch.Generator())


def test_timestep_range_bounds_t_and_the_full_range_draws_as_before(backend):
    target, lr = torch.rand(64, 3, 32, 32), _lr(64)
    full = backend.make_noised_batch(target, lr, torch.Generator().manual_seed(5))
    explicit = backend.make_noised_batch(target, lr, torch.Generator().manual_seed(5), t_range=(0.0, 1.0))
    plain = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(full.t, explicit.t) and torch.equal(full.t, plain)
    high = backend.make_noised_batch(target, lr, torch.Generator().manual_seed(5), t_range=(0.5, 1.0))
    assert high.t.min() >= 500 and high.t.max() <= 999
    low = backend.make_noised_batch(target, lr, torch.Generator().manual_seed(5), t_range=(0.0, 0.1))
    assert low.t.max() < 100


def test_save_and_load_trainable_restore_the_policy_but_not_the_reference(tmp_path):
    policy = TinyBackend.from_random(seed=2, unet_config=SMALL_UNET)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.01)
    policy.save_trainable(tmp_path / "ckpt")
    fresh = TinyBackend.from_random(seed=2, unet_config=SMALL_UNET)
    fresh.load_trainable(tmp_path / "ckpt")
    for a, b in zip(policy.unet.parameters(), fresh.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    ref_before = next(iter(TinyBackend.from_random(seed=2, unet_config=SMALL_UNET).reference.parameters()))
    assert torch.equal(next(iter(fresh.reference.parameters())), ref_before)
    assert list(TinyBackend.from_pretrained(tmp_path / "ckpt").unet.config.block_out_channels) == [8, 16, 16]


def test_missing_folder_raises_backend_error_naming_the_model_field(tmp_path):
    with pytest.raises(BackendError, match="model"):
        build_backend(BackendConfig(kind="tiny", model=str(tmp_path / "nope")))


def test_bundled_weights_load_by_default_and_give_finite_images():
    if not (bundled_weights_dir() / "unet").is_dir():
        pytest.fail(
            f"bundled weights missing under {bundled_weights_dir()}; run python -m scripts.pretrain_tiny"
        )
    backend = build_backend(BackendConfig(kind="tiny", num_inference_steps=2))
    out = backend.sample(_lr(1, h=8, w=8), seeds=[0])
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    size = sum(f.stat().st_size for f in bundled_weights_dir().rglob("*.safetensors"))
    assert size <= 10 * 2**20


def test_train_loop_draws_timesteps_from_the_configured_range(tmp_path):
    import pyarrow as pa

    from dp2o.config import TrainConfig
    from dp2o.storage import Storage
    from dp2o.train.loop import train_dpo

    backend = TinyBackend.from_random(seed=3, unet_config=SMALL_UNET)
    drawn = []
    make = backend.make_noised_batch

    def spy(*args, **kwargs):
        batch = make(*args, **kwargs)
        drawn.append(batch.t)
        return batch

    backend.make_noised_batch = spy

    class Images:
        def candidates(self, sample_ids, candidate_ids):
            return torch.stack([torch.full((3, 32, 32), 0.1 * (int(c) + 1)) for c in candidate_ids])

        def lr(self, sample_ids):
            return _lr(len(sample_ids))

    pairs = pa.table({"sample_id": ["a", "b"], "win": [0, 1], "lose": [2, 3]})
    cfg = TrainConfig(steps=3, pairs_per_step=2, micro_batch=2, timestep_range=(0.9, 1.0), checkpoint_every=3)
    train_dpo(backend, pairs, Images(), cfg, Storage(str(tmp_path / "run")), log=lambda _: None)
    t = torch.cat(drawn)
    assert len(drawn) == 3 and t.min() >= 900 and t.max() <= 999
