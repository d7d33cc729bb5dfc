"""PPO's clipped policy and value losses, entropy, and the PPO-ptx language-modelling term.

Shapes: B episodes, T response positions, V vocabulary; `mask` [B, T] is 1 on real response tokens. Losses are
masked means over real tokens (every token of the minibatch weighs the same), so padding never contributes a
value or a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignlab.rl.advantages import masked_mean


@dataclass
class PolicyLossOut:
    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # share of tokens whose ratio was clipped (the clipped term was the active one)
    approxkl: torch.Tensor  # 0.5 * mean((logp - logp_old)^2), a cheap estimate of KL(old || new)
    ratio_mean: torch.Tensor  # mean of rho = pi / pi_old


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> PolicyLossOut:
    """Clipped surrogate: masked mean of max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)), rho = exp(logp - logp_old).

    logprobs: [B, T] under the current policy (requires grad); old_logprobs, advantages: [B, T] from the rollout.
    Where the clipped term is the larger one, its gradient w.r.t. logprobs is exactly 0.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOut(loss, clipfrac, approxkl, ratio_mean)


@dataclass
class ValueLossOut:
    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # share of tokens where the clipped error was the larger one


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> ValueLossOut:
    """0.5 * masked mean of max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2).

    values: [B, T] current critic (requires grad); old_values, returns: [B, T] from the rollout. With
    |V - V_old| <= eps_v everywhere it equals the unclipped 0.5 * mean((V - R)^2).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err_unclipped).float(), mask)
    return ValueLossOut(loss, clipfrac)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [B, T] of the categorical distributions given by logits [B, T, V]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PPO-ptx's pretraining term: mean NLL per target token of next-token prediction.

    logits: [B, L, V] for input tokens [B, L]; labels: [B, L], -100 where no loss (padding). Per-token mean is the
    normalisation gamma_ptx multiplies (stage.ptx_coef's doc says so): the objective is
    ppo_loss + ptx_coef * lm_loss, both per-token means.
    """
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="mean"
    )
