"""Reward math: normalisation, whitening, Llama 2's helpfulness + safety rule. Pure tensor functions.

Scoring text with reward models (loading them, reading and writing a model's stored normalisation) is
alignlab/scoring.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the whole tensor; a batch of one (or all-equal values) is only centred."""
    centred = x - x.mean()
    if x.numel() < 2:
        return centred
    return centred / (x.std() + eps)


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log(p / (1 - p)) with p clamped to [eps, 1 - eps] so 0 and 1 stay finite."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def llama2_select(
    z_helpful: torch.Tensor, z_safety: torch.Tensor, is_safety: torch.Tensor, threshold: float = 0.15
) -> torch.Tensor:
    """Llama 2's R_c in [0, 1]: sigmoid(safety score) where the prompt is safety-tagged or that score is below the
    threshold, sigmoid(helpfulness score) elsewhere. z_*: raw RM outputs [B]; is_safety: bool [B]."""
    r_h, r_s = torch.sigmoid(z_helpful.float()), torch.sigmoid(z_safety.float())
    use_safety = is_safety.bool() | (r_s < threshold)
    return torch.where(use_safety, r_s, r_h)


def llama2_reward(
    z_helpful: torch.Tensor,
    z_safety: torch.Tensor,
    is_safety: torch.Tensor,
    threshold: float = 0.15,
    whiten_batch: bool = True,
) -> torch.Tensor:
    """R~ = WHITEN(LOGIT(R_c)) (Llama 2 §3.2.2); the caller subtracts the KL penalty."""
    r = logit(llama2_select(z_helpful, z_safety, is_safety, threshold))
    return whiten(r) if whiten_batch else r


@dataclass(frozen=True)
class Normalization:
    """score -> gain * score + bias; fitted so reference-policy samples score mean 0, std 1 (lm-human-preferences)."""

    gain: float = 1.0
    bias: float = 0.0
    fitted_on: int = 0  # samples the statistics came from (0 = identity, never fitted)
    mean: float = 0.0  # raw score mean of those samples
    std: float = 1.0  # raw score std of those samples

    @classmethod
    def fit(cls, scores: torch.Tensor, eps: float = 1e-8) -> Normalization:
        if scores.numel() < 2:
            raise ValueError(f"reward normalisation needs at least 2 samples, got {scores.numel()}")
        mean, std = scores.double().mean().item(), scores.double().std().item()
        gain = 1.0 / (std + eps)
        return cls(gain=gain, bias=-mean * gain, fitted_on=scores.numel(), mean=mean, std=std)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * self.gain + self.bias
