"""Comparison metrics of the evaluation harness: rates with 95% Wilson intervals and pairwise win rates."""

from __future__ import annotations

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
