"""The Diffusion-DPO pair loss and the noising conventions it is trained with, as pure torch functions.

A backend turns a batch of (winner, loser) images into per-sample prediction errors of the policy and of the
frozen reference (`dp2o.models.base.Backend.prediction_errors`); everything after that lives here, so one
tested implementation serves every model family (ε-, v- and flow-prediction).

The design choice a reader might miss: the loss takes *errors*, not predictions. Winner and loser must have been
noised with the same timestep and the same noise, and the errors must be means over C, H, W (not sums): with
sums, β would have to change with the image size. Errors are promoted to float32 before β (≈5000) multiplies
their differences, because in bfloat16 those differences are mostly rounding noise.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PredictionKind = Literal["epsilon", "v_prediction", "flow"]
_KINDS: tuple[str, ...] = ("epsilon", "v_prediction", "flow")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, [B] float32, averaged over every non-batch dimension.

    pred, target: [B, ...] tensors of the same shape, any float dtype; the squared differences are summed in
    float32 even when the model runs in half precision. Shapes must match exactly: silent broadcasting of a
    [B, 1, H, W] prediction against a [B, C, H, W] target would give a plausible-looking but wrong error.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"per_sample_mse: prediction shape {tuple(pred.shape)} differs from target shape "
            f"{tuple(target.shape)}; the model output must have the target's shape"
        )
    if pred.ndim < 1 or pred.shape[0] == 0:
        raise ValueError(f"per_sample_mse: need a non-empty batch dimension, got shape {tuple(pred.shape)}")
    diff = pred.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; use one of {', '.join(_KINDS)}")


def _per_sample(value: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    """`value` (a scalar or a [B] tensor) shaped [B, 1, ..., 1] to broadcast against `like` ([B, ...])."""
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        return v
    if v.ndim != 1 or v.shape[0] != like.shape[0]:
        raise ValueError(
            f"{name} must be a scalar or a [B] tensor with B={like.shape[0]}, got shape {tuple(v.shape)}"
        )
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _schedule_args(
    kind: str,
    x0: torch.Tensor,
    alphas_cumprod_t: torch.Tensor | float | None,
    sigma: torch.Tensor | float | None,
    *,
    need_alpha: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    _check_kind(kind)
    if kind == "flow":
        if alphas_cumprod_t is not None:
            raise ValueError("flow models are parameterised by sigma; pass sigma=..., not alphas_cumprod_t")
        if sigma is None:
            raise ValueError("kind='flow' needs sigma (the flow time in [0, 1], scalar or [B])")
        return None, _per_sample(sigma, x0, "sigma")
    if sigma is not None:
        raise ValueError(f"kind={kind!r} is parameterised by alphas_cumprod_t; pass that, not sigma")
    if alphas_cumprod_t is None:
        if need_alpha:
            raise ValueError(
                f"kind={kind!r} needs alphas_cumprod_t (the scheduler's alphas_cumprod at each sample's "
                "timestep, scalar or [B])"
            )
        return None, None
    return _per_sample(alphas_cumprod_t, x0, "alphas_cumprod_t"), None


def noisy_input(
    kind: PredictionKind,
    x0: torch.Tensor,
    noise: torch.Tensor,
    *,
    alphas_cumprod_t: torch.Tensor | float | None = None,
    sigma: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The noised model input x_t for clean targets x0 and Gaussian noise.

    x0, noise: [B, C, H, W] (or any [B, ...]) float tensors of one shape, in the model's working space.
    epsilon / v_prediction: x_t = sqrt(ā_t)·x0 + sqrt(1 − ā_t)·noise, with ā_t = `alphas_cumprod_t`.
    flow: x_t = (1 − σ)·x0 + σ·noise, with σ = `sigma` in [0, 1] (rectified flow, σ=1 is pure noise).
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} differs from noise shape {tuple(noise.shape)}")
    a, s = _schedule_args(kind, x0, alphas_cumprod_t, sigma, need_alpha=True)
    if s is not None:
        return (1 - s) * x0 + s * noise
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def prediction_target(
    kind: PredictionKind,
    x0: torch.Tensor,
    noise: torch.Tensor,
    *,
    alphas_cumprod_t: torch.Tensor | float | None = None,
    sigma: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """What the network should output at x_t = `noisy_input(kind, x0, noise, ...)`.

    x0, noise: [B, ...] float tensors of one shape.
    epsilon: the noise. v_prediction: sqrt(ā_t)·noise − sqrt(1 − ā_t)·x0 (needs `alphas_cumprod_t`).
    flow: the velocity noise − x0 = d x_t / dσ (σ is accepted for symmetry with `noisy_input`, not needed).
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} differs from noise shape {tuple(noise.shape)}")
    a, _ = _schedule_args(kind, x0, alphas_cumprod_t, sigma, need_alpha=kind == "v_prediction")
    if kind == "epsilon":
        return noise
    if kind == "flow":
        return noise - x0
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def dpo_loss(
    err_w: torch.Tensor,
    err_ref_w: torch.Tensor,
    err_l: torch.Tensor,
    err_ref_l: torch.Tensor,
    *,
    beta: float,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted Diffusion-DPO loss over P pairs, and scalars worth logging.

    err_w, err_l:          [P] policy errors (mean over C, H, W) on winner and loser, with gradients
    err_ref_w, err_ref_l:  [P] frozen-reference errors on the same x_t (same t and noise as the policy's)
    weight:                [P] per-pair weights (HPO), or None for all ones

    Per pair, with Δ = (err_w − err_ref_w) − (err_l − err_ref_l) and margin m = −(β/2)·Δ:
    ℓ = −log σ(m), computed as softplus(−m) so it stays finite for |m| in the thousands. Returns
    mean(weight·ℓ). When policy == reference, m = 0 and ℓ = ln 2 for every pair.

    Logs: `loss`; `implicit_acc`, the fraction of pairs with m > 0 (the policy lowered its winner error
    relative to its loser error more than the reference did), where a tie m == 0 counts one half, so an
    untrained policy reads 0.5 (chance) rather than 0; `reward_margin`, the mean of m; the means of the four
    errors; `weight`, the mean weight.
    """
    errs = {"err_w": err_w, "err_ref_w": err_ref_w, "err_l": err_l, "err_ref_l": err_ref_l}
    if weight is not None:
        errs["weight"] = weight
    for name, value in errs.items():
        if value.ndim != 1 or value.shape != err_w.shape:
            raise ValueError(
                f"dpo_loss: {name} has shape {tuple(value.shape)}; every input must be a [P] vector like "
                f"err_w {tuple(err_w.shape)} (one value per pair)"
            )
    if err_w.shape[0] == 0:
        raise ValueError("dpo_loss: got zero pairs")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be positive, got {beta}")

    model_diff = err_w.float() - err_ref_w.float()
    loser_diff = err_l.float() - err_ref_l.float()
    margin = -0.5 * beta * (model_diff - loser_diff)
    per_pair = F.softplus(-margin)
    w = torch.ones_like(per_pair) if weight is None else weight.to(per_pair.dtype)
    loss = (w * per_pair).mean()

    with torch.no_grad():
        m = margin.detach()
        acc = ((m > 0).float() + 0.5 * (m == 0).float()).mean()
        logs = {
            "loss": loss.detach().item(),
            "implicit_acc": acc.item(),
            "reward_margin": m.mean().item(),
            "err_w": err_w.detach().float().mean().item(),
            "err_l": err_l.detach().float().mean().item(),
            "err_ref_w": err_ref_w.detach().float().mean().item(),
            "err_ref_l": err_ref_l.detach().float().mean().item(),
            "weight": w.detach().mean().item(),
        }
    return loss, logs
