"""Selection rules of rejection sampling and context distillation (Llama 2 §3.2.3, §4.2.4); pure functions.

Spec: the project's RLHF spec (rlhf.md), sections 5-6 and invariant 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BestOfN:
    """Best-of-N over one pool: mean and median over prompts of max_{i<=N} r_i, for N = 1..K."""

    n: list[int]
    mean: list[float]
    median: list[float]

    def as_rows(self) -> list[dict]:
        return [
            {"n": n, "mean": m, "median": md} for n, m, md in zip(self.n, self.mean, self.median, strict=True)
        ]


def best_of_n(scores: torch.Tensor) -> BestOfN:
    """Best-of-N curves from one pool of samples, in the order they were drawn. scores: [P, K].

    max over the first N samples of each prompt (a running max along K), then the mean and the median over prompts
    (the median of an even count is the mean of the two middle values).
    """
    if scores.dim() != 2 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty [prompts, samples] tensor, got {tuple(scores.shape)}")
    running = scores.double().cummax(dim=1).values  # [P, K]
    sorted_, _ = running.sort(dim=0)
    p = scores.shape[0]
    median = (sorted_[(p - 1) // 2] + sorted_[p // 2]) / 2
    return BestOfN(
        n=list(range(1, scores.shape[1] + 1)),
        mean=running.mean(0).tolist(),
        median=median.tolist(),
    )


def keep_best(candidates: dict[str, list[dict]]) -> dict[str, dict]:
    """For every prompt, its highest-scoring candidate over all the pools it appeared in.

    candidates: prompt -> samples {"response", "score", "iteration", ...} gathered from every iteration that keeps
    (Llama 2 RLHF-V3 on: top samples from ALL prior iterations). Ties keep the earliest candidate.
    """
    kept = {}
    for prompt, samples in candidates.items():
        if not samples:
            raise ValueError(f"prompt {prompt!r} has no candidate samples")
        kept[prompt] = max(samples, key=lambda s: s["score"])  # max() keeps the first of equal scores
    return kept


def distillation_gate(distilled: torch.Tensor, baseline: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Llama 2's RM gate: keep a preprompted answer only when the (safety) RM scores it above the model's answer
    without the preprompt by more than margin. distilled, baseline: [B] scores of both answers, each scored on the
    prompt WITHOUT the preprompt. Returns a bool mask [B]."""
    if distilled.shape != baseline.shape:
        raise ValueError(f"score shapes differ: {tuple(distilled.shape)} vs {tuple(baseline.shape)}")
    return distilled > baseline + margin


TRUNCATED = ("drop", "keep")  # what selection does with answers that ran out of budget (no EOS)


@dataclass(frozen=True)
class KeptSet:
    """keep_complete's result: the kept candidate per prompt and what the truncation rule did."""

    kept: dict[str, dict]  # prompt -> its highest-scoring candidate
    truncated_dropped: int  # candidates without EOS left out before selection (truncated=drop)
    truncated_kept: int  # kept candidates without EOS (truncated=keep)
    all_truncated: list[str]  # prompts whose every candidate lacks an EOS: nothing kept (truncated=drop)


def keep_complete(candidates: dict[str, list[dict]], truncated: str = "drop") -> KeptSet:
    """keep_best under a rule for answers that ran out of budget (candidates carry "ended": False).

    drop (Llama 2 fine-tunes on complete samples): truncated candidates never compete, and a prompt whose every
    candidate is truncated keeps nothing, since fine-tuning on a cut-off answer with an EOS appended teaches the
    model to stop mid-answer. keep: selection as keep_best, the kept truncated ones counted.
    """
    if truncated not in TRUNCATED:
        raise ValueError(f"truncated={truncated!r}; choose one of {', '.join(TRUNCATED)}")
    if truncated == "keep":
        kept = keep_best(candidates)
        return KeptSet(kept, 0, sum(not c.get("ended", True) for c in kept.values()), [])
    for prompt, cs in candidates.items():
        if not cs:
            raise ValueError(f"prompt {prompt!r} has no candidate samples")
    complete = {p: [c for c in cs if c.get("ended", True)] for p, cs in candidates.items()}
    dropped = sum(len(cs) - len(complete[p]) for p, cs in candidates.items())
    empty = [p for p, cs in complete.items() if not cs]
    kept = keep_best({p: cs for p, cs in complete.items() if cs})
    return KeptSet(kept, dropped, 0, empty)
