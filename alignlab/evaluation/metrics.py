"""Comparison metrics of the evaluation harness: rates with 95% Wilson intervals, differences of two rates with
Newcombe's interval, paired differences with a bootstrap interval, and pairwise win rates."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from alignlab.evaluation.tinyhh import wilson_interval


@dataclass(frozen=True)
class Rate:
    """successes / n with its 95% Wilson interval."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    @classmethod
    def of(cls, successes: int, n: int) -> Rate:
        low, high = wilson_interval(successes, n)
        return cls(successes / n if n else float("nan"), low, high, n)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WinRate:
    """Pairwise comparison of two systems on the same prompts: rate = wins / (wins + losses), ties excluded."""

    wins: int
    losses: int
    ties: int
    rate: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict:
        return asdict(self)


def win_rate(a: list[float], b: list[float], tolerance: float = 1e-9) -> WinRate:
    """System a against system b: per prompt, a wins when its judge score is higher (by more than tolerance).

    a, b: judge scores of the two systems' answers to the same prompts, in the same order. The interval is the
    Wilson interval of wins among decided prompts; with no decided prompt the rate is 0.5 (no evidence either way).
    """
    if len(a) != len(b):
        raise ValueError(f"win rate needs scores for the same prompts: {len(a)} vs {len(b)}")
    wins = sum(x > y + tolerance for x, y in zip(a, b, strict=True))
    losses = sum(y > x + tolerance for x, y in zip(a, b, strict=True))
    decided = wins + losses
    low, high = wilson_interval(wins, decided)
    return WinRate(wins, losses, len(a) - decided, wins / decided if decided else 0.5, low, high)


@dataclass(frozen=True)
class Difference:
    """a - b of two rates with a 95% interval (Newcombe's hybrid score method, from the two Wilson intervals)."""

    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict:
        return asdict(self)


def rate_difference(a: Rate, b: Rate) -> Difference:
    """Difference of two independent rates; the interval excludes 0 when the data support an ordering.

    Newcombe (1998), method 10: the difference's bounds combine each rate's distance to its own Wilson bounds, so
    it stays inside [-1, 1] and behaves at rates of 0 and 1, where the Wald interval collapses. Two Wilson
    intervals that overlap a little can still give a difference interval above 0 (overlap is the stricter test).
    """
    d = a.value - b.value
    low = d - math.sqrt((a.value - a.ci_low) ** 2 + (b.ci_high - b.value) ** 2)
    high = d + math.sqrt((a.ci_high - a.value) ** 2 + (b.value - b.ci_low) ** 2)
    return Difference(d, max(-1.0, low), min(1.0, high))


def paired_difference(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> Difference:
    """mean(a) - mean(b) of per-prompt scores of two systems on the same prompts (e.g. each prompt's share of its
    answers that were harmless), with a 95% percentile interval from a bootstrap over prompts.

    Paired: a prompt's two scores move together (an easy prompt is easy for both), so the interval is far narrower
    than two independent rates' (rate_difference), and several answers per prompt sharpen each score. Used by
    scripts/paired_eval.py (docs/results.md: rejection sampling's and context distillation's small gains).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same prompts: {len(a)} against {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(resamples))
    low, high = means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
    return Difference(sum(diffs) / len(diffs), low, high)
