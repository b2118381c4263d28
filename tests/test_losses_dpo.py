"""Guarantees of the Diffusion-DPO loss and the ε / v / flow noising conventions (dp2o.train.losses)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from dp2o.train.losses import dpo_loss, per_sample_mse
from tests.helpers import assert_starts_at_ln2

torch.set_num_threads(1)


def _errors(p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(p, generator=g) * 0.2 + 0.05


# ---- dpo_loss -----------------------------------------------------------------------------------------------


def test_loss_is_ln2_and_accuracy_is_chance_when_policy_equals_reference():
    err_w, err_l = _errors(64, 0), _errors(64, 1)
    loss, logs = dpo_loss(err_w, err_w.clone(), err_l, err_l.clone(), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert logs["implicit_acc"] == 0.5
    assert logs["reward_margin"] == 0.0
    assert logs["weight"] == 1.0


def test_loss_matches_hand_computed_values():
    # pair 0: Δ = (0.10 − 0.12) − (0.20 − 0.19) = −0.03, m = −(100/2)(−0.03) = 1.5, ℓ = log(1 + e^−1.5)
    # pair 1: Δ = (0.30 − 0.25) − (0.10 − 0.10) = 0.05,  m = −2.5,            ℓ = log(1 + e^2.5)
    err_w = torch.tensor([0.10, 0.30])
    err_ref_w = torch.tensor([0.12, 0.25])
    err_l = torch.tensor([0.20, 0.10])
    err_ref_l = torch.tensor([0.19, 0.10])
    l0, l1 = math.log1p(math.exp(-1.5)), math.log1p(math.exp(2.5))
    loss, logs = dpo_loss(err_w, err_ref_w, err_l, err_ref_l, beta=100.0)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    assert logs["implicit_acc"] == 0.5  # pair 0 prefers the winner more than the reference, pair 1 does not
    assert logs["reward_margin"] == pytest.approx((1.5 - 2.5) / 2, rel=1e-4)
    assert logs["err_w"] == pytest.approx(0.2)
    assert logs["err_ref_w"] == pytest.approx(0.185)
    assert logs["err_l"] == pytest.approx(0.15)
    assert logs["err_ref_l"] == pytest.approx(0.145)

    weight = torch.tensor([0.5, 3.0])
    loss_w, logs_w = dpo_loss(err_w, err_ref_w, err_l, err_ref_l, beta=100.0, weight=weight)
    assert loss_w.item() == pytest.approx((0.5 * l0 + 3.0 * l1) / 2, rel=1e-5)
    assert logs_w["weight"] == pytest.approx(1.75)


def test_weights_scale_each_pair_term_and_ones_equal_no_weight():
    err_w, err_ref_w, err_l, err_ref_l = (_errors(16, s) for s in range(4))
    base, _ = dpo_loss(err_w, err_ref_w, err_l, err_ref_l, beta=50.0)
    ones, _ = dpo_loss(err_w, err_ref_w, err_l, err_ref_l, beta=50.0, weight=torch.ones(16))
    assert ones.item() == pytest.approx(base.item(), rel=1e-7)
    # a weight on one pair changes the loss by exactly that pair's term times (w - 1) / P
    single = [
        dpo_loss(*(x[i : i + 1] for x in (err_w, err_ref_w, err_l, err_ref_l)), beta=50.0)[0]
        for i in range(16)
    ]
    weight = torch.ones(16)
    weight[3] = 4.0
    weighted, _ = dpo_loss(err_w, err_ref_w, err_l, err_ref_l, beta=50.0, weight=weight)
    assert weighted.item() == pytest.approx(base.item() + 3.0 * single[3].item() / 16, rel=1e-6)
    # zero weight removes a pair entirely
    weight = torch.ones(16)
    weight[5] = 0.0
    dropped, _ = dpo_loss(err_w, err_ref_w, err_l, err_ref_l, beta=50.0, weight=weight)
    assert dropped.item() == pytest.approx(base.item() - single[5].item() / 16, rel=1e-6)


def test_loss_stays_finite_for_huge_margins():
    # β = 5000 with an error gap of 1 gives |m| = 2500: log(sigmoid(m)) underflows, softplus does not
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    bad, _ = dpo_loss(one, zero, zero, zero, beta=5000.0)
    good, logs = dpo_loss(zero, one, zero, zero, beta=5000.0)
    assert bad.item() == pytest.approx(2500.0)
    assert good.item() == 0.0
    assert logs["implicit_acc"] == 1.0


def test_bfloat16_errors_are_promoted_before_beta():
    half = [_errors(8, s).bfloat16() for s in range(4)]
    loss, _ = dpo_loss(*half, beta=5000.0)
    assert loss.dtype == torch.float32
    exact, _ = dpo_loss(*(x.float() for x in half), beta=5000.0)
    assert loss.item() == exact.item()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight": torch.ones(3)}, "weight has shape"),
        ({"beta": 0.0}, "beta must be positive"),
    ],
)
def test_dpo_loss_rejects_bad_input(kwargs, match):
    e = torch.ones(4)
    args = {"beta": 10.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        dpo_loss(e, e, e, e, **args)


def test_dpo_loss_rejects_mismatched_pair_counts():
    with pytest.raises(ValueError, match="err_l has shape"):
        dpo_loss(torch.ones(4), torch.ones(4), torch.ones(5), torch.ones(4), beta=1.0)


def test_one_sgd_step_on_a_unet_moves_the_policy_toward_the_winner():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    reference = UNet2DModel.from_config(unet.config)
    reference.load_state_dict(unet.state_dict())
    reference.requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    g = torch.Generator().manual_seed(1)
    p = 4
    winners = torch.rand(p, 3, 8, 8, generator=g) * 2 - 1
    losers = torch.rand(p, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(p, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (p,), generator=g)

    def errors(model):
        # winner and loser share t and noise, as the loss requires
        x0 = torch.cat([winners, losers])
        eps = torch.cat([noise, noise])
        x_t = scheduler.add_noise(x0, eps, torch.cat([t, t]))
        err = per_sample_mse(model(x_t, torch.cat([t, t])).sample, eps)
        return err[:p], err[p:]

    with torch.no_grad():
        ref_w, ref_l = errors(reference)
    err_w, err_l = errors(unet)
    loss, logs = dpo_loss(err_w, ref_w, err_l, ref_l, beta=5000.0)
    assert_starts_at_ln2(loss, torch.cat([err_w, err_l]), torch.cat([ref_w, ref_l]), beta=5000.0)
    loss.backward()
    with torch.no_grad():
        for param in unet.parameters():
            param -= 1e-4 * param.grad

    with torch.no_grad():
        new_w, new_l = errors(unet)
        after, logs_after = dpo_loss(new_w, ref_w, new_l, ref_l, beta=5000.0)
    # the policy's winner error fell relative to its loser error, compared with the reference
    assert ((new_w - ref_w) - (new_l - ref_l) < 0).all()
    assert after.item() < math.log(2)
    assert logs_after["implicit_acc"] == 1.0
