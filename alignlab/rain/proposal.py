"""Candidate proposal math: next-token distributions, top-k truncation, sampling by inverse CDF.

Every random choice of the search is an inverse-CDF draw at a uniform taken from the prompt's own generator in
a fixed order. Results therefore do not depend on how rows are batched, which prompts share a batch, or what
torch's global RNG did: the batched search and the plain reference search make the same choices.
"""

from __future__ import annotations

import torch


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) in float64: logits [V] -> probs [V].

    temperature > 1 flattens the distribution (the authors' adv/ proposals use 2.0); it never changes the ranking.
    """
    x = logits.double()
    if temperature != 1.0:  # as the code's logits processor: no warper at 1, so T=1 is bit-for-bit the same
        x = x / temperature
    return torch.softmax(x, dim=-1)


def top_k_probs(probs: torch.Tensor, k: int) -> torch.Tensor:
    """probs [V] truncated to the k most probable tokens and renormalised (the code's TopKLogitsWarper) -> [V]."""
    if k <= 0 or k >= probs.numel():
        return probs
    keep = torch.topk(probs, k).indices
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def sample_index(probs: torch.Tensor, u: float) -> int:
    """The token whose CDF interval holds u in [0, 1): probs [V] (need not sum exactly to 1) -> token id.

    A zero-probability token is never returned: its CDF interval is empty.
    """
    cdf = torch.cumsum(probs, dim=0)
    x = torch.tensor([u], dtype=cdf.dtype) * cdf[-1]
    i = int(torch.searchsorted(cdf, x, right=True).item())
    if i >= probs.numel():  # u * total rounded onto the last boundary: the last token with mass
        i = int(torch.nonzero(probs > 0).max().item())
    return i


def ranked_tokens(probs: torch.Tensor, m: int) -> list[tuple[int, float]]:
    """The m most probable (token, prob) pairs of probs [V], most probable first."""
    top = torch.topk(probs, min(m, probs.numel()))
    return [(int(t), float(p)) for t, p in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
