"""Masked statistics, whitening and generalised advantage estimation over response tokens.

Shapes: B episodes, T response positions; `mask` [B, T] is 1 on real response tokens (up to and including the
EOS that ends the answer) and 0 on the padding after it. Every function is pure.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (all of them, or along dim)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over masked positions (Bessel-corrected by default, as the reference implementations)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n < 2:
            raise ValueError(
                f"masked_var needs at least 2 valid positions, got {int(n)}: whitening a batch this small is "
                "meaningless; use a larger minibatch or turn whitening off"
            )
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over masked positions; pads are set to 0.

    shift_mean=False keeps the mean (x * rsqrt(var) + mean shift undone): the reference implementations whiten
    rewards this way so that a constant reward signal survives, and advantages with shift_mean=True.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) per response position.

    rewards, values, mask: [B, T]. V is taken as 0 after the last valid position of each row (the episode has
    ended), and rewards/values at masked positions are ignored. Returns (advantages, returns) [B, T], both 0 on
    padding; returns = advantages + values.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        # On padding (mask 0) the recursion passes nothing backward: V_{t+1} and A_{t+1} of the last real token
        # are the zeros after the end of the episode.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        next_adv, next_value = adv, values[:, t]
    return advantages, (advantages + values) * mask


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[target - prediction] / Var[target] over masked positions (1 = perfect critic, <= 0 = useless)."""
    var_t = masked_var(targets, mask, unbiased=False)
    if var_t <= 0:
        return float("nan")
    return float(1 - masked_var(targets - predictions, mask, unbiased=False) / var_t)


GROUP_ESTIMATORS = (
    "grpo",
    "rloo",
)  # group_advantages' kinds: critic-free, one baseline per prompt's K samples


def group_advantages(returns: torch.Tensor, group_size: int, kind: str, eps: float = 1e-4) -> torch.Tensor:
    """Critic-free advantages [B] of B = n x K episodes, K consecutive samples per prompt (a group).

    grpo (Shao et al. 2024, DeepSeekMath eq. 3, outcome supervision): A_i = (R_i - mean_g R) / (std_g R + eps),
      std the Bessel-corrected standard deviation of the group (as TRL's GRPOTrainer); a group whose K returns are
      equal has no signal (A = 0).
    rloo (Ahmadian et al. 2024, REINFORCE leave-one-out; Kool et al. 2019): A_i = R_i - mean_{j != i} R_j
      = K / (K - 1) * (R_i - mean_g R), the baseline each sample's K - 1 siblings, unbiased.
    returns: [B] per-episode returns (the score, and under a reward-side KL penalty its summed non-score part).
    """
    if kind not in GROUP_ESTIMATORS:
        raise ValueError(f"kind={kind!r}; choose one of {', '.join(GROUP_ESTIMATORS)}")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group baseline needs K >= 2 samples per prompt")
    if returns.dim() != 1 or len(returns) % group_size:
        raise ValueError(
            f"{tuple(returns.shape)} returns are not whole groups of {group_size} (K consecutive samples per prompt)"
        )
    groups = returns.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if kind == "grpo":
        return (centred / (groups.std(1, keepdim=True) + eps)).view(-1)
    return (centred * group_size / (group_size - 1)).view(-1)
