"""The messages between a search and whoever serves its model work (alignlab.rain.lockstep, or a test).

A search yields a request and receives its result; it never holds a model. That is what lets one driver batch
the requests of many searches, and a test drive a search by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class Extend:
    """Run each row's tokens on top of its prefix segments -> (new segments or None, next-token logits [R, V])."""

    rows: list[tuple[tuple[Any, ...], list[int]]]
    want_cache: bool = True
    purpose: str = ""  # root | expand | rollout | judge | add (for the cost breakdown)


@dataclass
class Embed:
    """Embed texts -> [N, D]."""

    texts: list[str]


@dataclass
class Score:
    """Reward-model evaluator (extension): score (prompt, response) pairs -> [N]."""

    pairs: list[tuple[str, str]]


class Backend(Protocol):
    """Serves Extend rows: (prefix segments, new tokens) -> (each row's new-token segment or None, logits [R, V])."""

    def extend(
        self, rows: list[tuple[tuple[Any, ...], list[int]]], want_cache: bool = True
    ) -> tuple[list[Any] | None, torch.Tensor]: ...
