"""The Diffusion-DPO pair loss, as pure torch functions (the backends noise their inputs with diffusers' schedulers).

A backend turns a batch of (winner, loser) images into per-sample prediction errors of the policy and of the
frozen reference (`dp2o.models.base.Backend.prediction_errors`); everything after that lives here, so one
tested implementation serves every model family (ε-, v- and flow-prediction).

The design choice a reader might miss: the loss takes *errors*, not predictions. Winner and loser must have been
noised with the same timestep and the same noise, and the errors must be means over C, H, W (not sums): with
sums, β would have to change with the image size. Errors are promoted to float32 before β (≈5000) multiplies
their differences, because in bfloat16 those differences are mostly rounding noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
