"""Reward-model losses: Llama 2's margin ranking loss and InstructGPT's K-way ranking loss. Pure tensor math."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# chosen/rejected pairs (pairwise_loss) or InstructGPT's K ranked answers per prompt (kway_loss)
RANKINGS = ("pairwise", "kway")
# Llama 2 (Touvron et al. 2023, Table 27): margin m(r) by rating level, chosen over rejected.
RATING_LEVELS = ("significantly better", "better", "slightly better", "negligibly better")
MARGINS = {
    "none": dict.fromkeys(RATING_LEVELS, 0.0),
    "small": dict(zip(RATING_LEVELS, (1.0, 2 / 3, 1 / 3, 0.0), strict=True)),
    "large": dict(zip(RATING_LEVELS, (3.0, 2.0, 1.0, 0.0), strict=True)),
}


def margin_for(rating: str, table: str) -> float:
    """m(rating) from the named table; "unsure" counts as negligibly better (Llama 2 merges the two)."""
    if table not in MARGINS:
        raise ValueError(f"table={table!r}; choose one of {', '.join(MARGINS)}")
    rating = "negligibly better" if rating == "unsure" else rating
    if rating not in MARGINS[table]:
        raise ValueError(f"rating {rating!r} is not one of {', '.join(RATING_LEVELS)} (or 'unsure')")
    return MARGINS[table][rating]


def pairwise_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """mean(-log sigmoid(r_c - r_r - m)) + center_coef * mean((r_c + r_r)^2); r_*, m: [B] -> scalar."""
    diff = r_chosen - r_rejected - (0.0 if margin is None else margin)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def ranked_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of one ranked set (rank 0 = best); tied answers make no pair.

    Without ties that is all C(K, 2) pairs.
    """
    k = len(ranks)
    return [
        (i, j) if ranks[i] < ranks[j] else (j, i)
        for i in range(k)
        for j in range(i + 1, k)
        if ranks[i] != ranks[j]
    ]


def kway_loss(
    scores: torch.Tensor, group: torch.Tensor, rank: torch.Tensor, center_coef: float = 0.0
) -> torch.Tensor:
    """InstructGPT's loss for ranked sets, every answer forwarded once.

    scores, group, rank: [N] over all answers of a batch (group = which set, rank 0 = best). Each set contributes
    the mean over its untied pairs of -log sigmoid(r_better - r_worse), i.e. weight 1/C(K, 2) per pair without ties;
    the loss is the mean over sets. center_coef adds coef * mean over sets of the mean of (r_i + r_j)^2 over pairs.
    """
    same = group[:, None] == group[None, :]
    better = same & (rank[:, None] < rank[None, :])  # [N, N]: i ranked above j in the same set
    diff = scores[:, None] - scores[None, :]
    n_sets = int(group.unique().numel())
    pairs_per_set = torch.zeros(n_sets, dtype=scores.dtype, device=scores.device)
    set_index = torch.unique(group, return_inverse=True)[1]
    pairs_per_set.index_add_(0, set_index, better.sum(1).to(scores.dtype))
    if (pairs_per_set == 0).any():
        raise ValueError("a ranked set has no untied pair (every answer shares one rank)")
    weight = better.to(scores.dtype) / pairs_per_set[set_index][:, None]  # row i belongs to i's set
    loss = (weight * -F.logsigmoid(diff)).sum() / n_sets
    if center_coef:
        loss = loss + center_coef * (weight * (scores[:, None] + scores[None, :]) ** 2).sum() / n_sets
    return loss
