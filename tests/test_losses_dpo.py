"""Guarantees of the Diffusion-DPO loss and the ε / v / flow noising conventions (dp2o.train.losses)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from dp2o.train.losses import dpo_loss, noisy_input, per_sample_mse, prediction_target

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
    a = scheduler.alphas_cumprod[t]

    def errors(model):
        # winner and loser share t and noise, as the loss requires
        x0 = torch.cat([winners, losers])
        eps = torch.cat([noise, noise])
        x_t = noisy_input("epsilon", x0, eps, alphas_cumprod_t=torch.cat([a, a]))
        err = per_sample_mse(model(x_t, torch.cat([t, t])).sample, prediction_target("epsilon", x0, eps))
        return err[:p], err[p:]

    with torch.no_grad():
        ref_w, ref_l = errors(reference)
    err_w, err_l = errors(unet)
    loss, logs = dpo_loss(err_w, ref_w, err_l, ref_l, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
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


# ---- prediction targets and noised inputs ------------------------------------------------------------------


def _pair(shape=(3, 4, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddpm_noisy_input_matches_diffusers_add_noise(kind):
    x0, noise = _pair()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    t = torch.tensor([0, 437, 999])
    ours = noisy_input(kind, x0, noise, alphas_cumprod_t=scheduler.alphas_cumprod[t])
    torch.testing.assert_close(ours, scheduler.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)


def test_epsilon_target_is_the_noise():
    x0, noise = _pair()
    assert torch.equal(prediction_target("epsilon", x0, noise), noise)


def test_v_target_matches_diffusers_get_velocity():
    x0, noise = _pair()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    t = torch.tensor([3, 500, 998])
    ours = prediction_target("v_prediction", x0, noise, alphas_cumprod_t=scheduler.alphas_cumprod[t])
    torch.testing.assert_close(ours, scheduler.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)


def test_v_target_recovers_x0_the_way_the_ddpm_sampler_does():
    # diffusers' DDPM step with prediction_type="v_prediction" computes x0 = sqrt(ā)·x_t − sqrt(1−ā)·v
    x0, noise = _pair()
    a = torch.tensor([0.9, 0.5, 0.01])
    x_t = noisy_input("v_prediction", x0, noise, alphas_cumprod_t=a)
    v = prediction_target("v_prediction", x0, noise, alphas_cumprod_t=a)
    a4 = a.view(-1, 1, 1, 1)
    torch.testing.assert_close(a4.sqrt() * x_t - (1 - a4).sqrt() * v, x0, rtol=1e-5, atol=1e-5)


def test_flow_input_and_velocity_match_diffusers_flow_match_euler():
    x0, noise = _pair()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(10)
    i = 3
    sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
    timestep = scheduler.timesteps[i]
    x_t = noisy_input("flow", x0, noise, sigma=sigma)
    torch.testing.assert_close(
        x_t, scheduler.scale_noise(x0, timestep.expand(3), noise), rtol=1e-5, atol=1e-6
    )
    # an Euler step with the exact velocity lands on the same path at the next sigma
    v = prediction_target("flow", x0, noise, sigma=sigma)
    scheduler._step_index = i
    stepped = scheduler.step(v, timestep, x_t).prev_sample
    torch.testing.assert_close(
        stepped, noisy_input("flow", x0, noise, sigma=sigma_next), rtol=1e-5, atol=1e-5
    )


def test_per_sample_schedule_values_broadcast_per_row():
    x0, noise = _pair()
    sigma = torch.tensor([0.0, 0.5, 1.0])
    x_t = noisy_input("flow", x0, noise, sigma=sigma)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.5 * (x0[1] + noise[1]))
    torch.testing.assert_close(x_t[2], noise[2])


@pytest.mark.parametrize(
    "fn, kind, kwargs, match",
    [
        (noisy_input, "epsilon", {}, "needs alphas_cumprod_t"),
        (prediction_target, "v_prediction", {}, "needs alphas_cumprod_t"),
        (noisy_input, "flow", {}, "needs sigma"),
        (noisy_input, "flow", {"alphas_cumprod_t": 0.5}, "pass sigma"),
        (noisy_input, "epsilon", {"sigma": 0.5}, "not sigma"),
        (noisy_input, "sample", {"alphas_cumprod_t": 0.5}, "unknown prediction kind"),
        (noisy_input, "epsilon", {"alphas_cumprod_t": torch.ones(2)}, r"\[B\] tensor with B=3"),
    ],
)
def test_schedule_arguments_are_checked(fn, kind, kwargs, match):
    x0, noise = _pair()
    with pytest.raises(ValueError, match=match):
        fn(kind, x0, noise, **kwargs)


# ---- per_sample_mse -----------------------------------------------------------------------------------------


def test_per_sample_mse_is_the_mean_over_non_batch_dims():
    pred, target = _pair((2, 3, 5, 7))
    expected = torch.stack([((pred[i] - target[i]) ** 2).mean() for i in range(2)])
    torch.testing.assert_close(per_sample_mse(pred, target), expected)


def test_per_sample_mse_accumulates_half_precision_in_float32():
    pred, target = _pair((2, 4, 16, 16))
    ours = per_sample_mse(pred.bfloat16(), target.bfloat16())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, per_sample_mse(pred.bfloat16().float(), target.bfloat16().float()))


def test_per_sample_mse_refuses_to_broadcast():
    with pytest.raises(ValueError, match="must have the target's shape"):
        per_sample_mse(torch.zeros(2, 1, 4, 4), torch.zeros(2, 3, 4, 4))
