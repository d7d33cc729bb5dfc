"""The one seeded held-out split: rows a stage measures itself on, never trained on.

Every stage that takes its held-out rows from its training data draws them the same way: the first n rows of one
seeded permutation (torch.randperm with its own generator, so the global RNG is untouched) are held out, the rest
train, both in permutation order. Stages differ only in how many rows they hold out (held_out_count's rules).
"""

from __future__ import annotations

from typing import TypeVar

import torch

T = TypeVar("T")


def held_out_count(
    n_rows: int,
    wanted: int,
    *,
    max_share: int | None = None,
    share_floor: int = 0,
    at_least: int | None = None,
    multiple_of: int = 1,
) -> int:
    """How many of n_rows rows to hold out when `wanted` are asked for, in this order:

    - max_share: at most n_rows // max_share (5: a fifth), a cap never below share_floor (1: a tiny data set still
      holds out one row when asked to); None: no cap;
    - at_least: then at least this many, whatever was asked for (None: no floor);
    - multiple_of: then rounded down to a multiple (the world size: every rank evaluates as many rows).
    """
    n = wanted
    if max_share is not None:
        n = min(n, max(share_floor, n_rows // max_share))
    if at_least is not None:
        n = max(at_least, n)
    return n - n % multiple_of


def seeded_split(
    rows: list[T],
    wanted: int,
    seed: int,
    *,
    max_share: int | None = None,
    share_floor: int = 0,
    at_least: int | None = None,
    multiple_of: int = 1,
) -> tuple[list[T], list[T]]:
    """(train, held-out): the first held_out_count(...) rows of the seeded permutation of rows are held out.

    The keywords are held_out_count's. The same (rows, count, seed) always gives the same rows, in the same order.
    """
    n = held_out_count(
        len(rows),
        wanted,
        max_share=max_share,
        share_floor=share_floor,
        at_least=at_least,
        multiple_of=multiple_of,
    )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order[n:]], [rows[i] for i in order[:n]]
