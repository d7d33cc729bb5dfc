"""Per-token KL estimators, KL-penalised per-token rewards, and the fixed / adaptive KL coefficient controllers.

Shapes: B episodes, T response positions; `mask` [B, T] is 1 on real response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The values each function below accepts (a config's Enum values are these strings: alignlab/choices.py)
ESTIMATORS = ("k1", "k3")  # kl_per_token's estimator
CONTROLLERS = ("fixed", "adaptive")  # kl_controller's kind
# shape_scores' missing_eos: what an answer that never ended scores
MISSING_EOS = ("none", "replace", "subtract")


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """KL(pi || pi_ref) estimate per sampled token [B, T], 0 on padding (samples drawn from pi).

    k1 = log pi(y) - log pi_ref(y): unbiased, can be negative per token (InstructGPT, TRL default).
    k3 = (rho - 1) - log rho with rho = pi_ref(y) / pi(y): unbiased and never negative (Schulman's estimator).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        k = log_ratio
    elif estimator == "k3":
        k = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"estimator={estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    return k * mask.to(k.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last real position of each row (t_end); 0 for an all-padding row."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).max(dim=1).values


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * k_t + [t == t_end] * score (InstructGPT / Ziegler et al.), 0 after t_end.

    scores: [B] sequence scores (normalised, clipped, EOS-penalised); kl: [B, T] per-token estimates.
    Returns (rewards [B, T], non_score_rewards [B, T] = -beta * k).
    """
    non_score = -beta * kl * mask.to(kl.dtype)
    rewards = non_score.clone()
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, non_score


def shape_scores(
    scores: torch.Tensor,
    ended_with_eos: torch.Tensor,
    *,
    missing_eos: str = "replace",
    missing_eos_penalty: float = 1.0,
    clip: float = 5.0,
) -> torch.Tensor:
    """The sequence score PPO optimises: EOS penalty, then clipping to [-clip, clip] (0 = no clipping).

    missing_eos: none | replace (lm-human-preferences: an answer that never ended scores -missing_eos_penalty)
    | subtract (TRL: missing_eos_penalty is subtracted). scores, ended_with_eos: [B].
    """
    missing = ~ended_with_eos.bool()
    if missing_eos == "replace":
        scores = torch.where(missing, torch.full_like(scores, -missing_eos_penalty), scores)
    elif missing_eos == "subtract":
        scores = scores - missing_eos_penalty * missing.to(scores.dtype)
    elif missing_eos != "none":
        raise ValueError(f"missing_eos={missing_eos!r}; choose one of {', '.join(MISSING_EOS)}")
    return scores.clamp(-clip, clip) if clip > 0 else scores


@dataclass
class FixedKLController:
    """beta stays what it was set to."""

    value: float

    def update(self, current_kl: float, n_episodes: int) -> None:
        pass


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019: beta follows a target KL, proportionally and bounded per update.

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon), where KL is the batch mean of the
    per-sequence summed KL and n the episodes in the batch.
    """

    value: float
    target: float
    horizon: int = 10_000

    def update(self, current_kl: float, n_episodes: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon


def kl_controller(kind: str, init: float, target: float, horizon: int):
    if kind == "fixed":
        return FixedKLController(init)
    if kind == "adaptive":
        if target <= 0 or horizon <= 0:
            raise ValueError(
                f"the adaptive controller needs target > 0 and horizon > 0, got {target}, {horizon}"
            )
        return AdaptiveKLController(init, target, horizon)
    raise ValueError(f"kind={kind!r}; choose one of {', '.join(CONTROLLERS)}")
