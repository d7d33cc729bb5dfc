"""Serve the requests of several prompts' searches together: one batched forward per round, not one per row.

Each round collects the pending request of every live search, runs all Extend rows as a few batched forwards
(rows of similar length together; identical rows once), all Embed texts as one call, and sends each search its
own slice. A search's choices depend only on its own results and its own uniforms, so grouping prompts changes
cost, never trees (tests/unit/rain/test_search_equivalence.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from alignlab.rain.requests import Backend, Embed, Extend, Score


@dataclass
class Timings:
    """Where the wall time of a lockstep run went."""

    forward_s: float = 0.0  # batched model forwards (Extend rows: expansion, rollout, judge, commits)
    embed_s: float = 0.0  # embedding calls
    score_s: float = 0.0  # reward-model evaluator calls (extension)
    search_s: float = 0.0  # the searches' own Python: tree bookkeeping, sampling, decoding, judge prompts
    rounds: int = 0
    forwards: int = 0
    rows_by_purpose: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {
            "forward_s": self.forward_s,
            "embed_s": self.embed_s,
            "score_s": self.score_s,
            "search_s": self.search_s,
            "rounds": self.rounds,
            "forwards": self.forwards,
        }


def length_buckets(lengths: list[int], max_rows: int) -> list[list[int]]:
    """Row indices grouped into forwards: sorted by length, a new group when padding would double the work
    (longest * rows > 2 * real tokens) or the group is full. lengths [R] -> groups of row indices."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        trial = cur + [i]
        if cur and (len(trial) > max_rows or lengths[i] * len(trial) > 2 * sum(lengths[j] for j in trial)):
            groups.append(cur)
            trial = [i]
        cur = trial
    if cur:
        groups.append(cur)
    return groups


def serve_extend(backend: Backend, requests: list[Extend], max_rows: int, timings: Timings) -> list[tuple]:
    """All rows of all requests, identical rows once, in length buckets -> per request (segments, logits)."""
    keys, unique, index = [], [], {}
    for req in requests:
        for prefix, toks in req.rows:
            key = (tuple(id(seg) for seg in prefix), tuple(toks))
            if key not in index:
                index[key] = len(unique)
                unique.append((prefix, toks, req.want_cache))
            keys.append(index[key])
            timings.rows_by_purpose[req.purpose] = timings.rows_by_purpose.get(req.purpose, 0) + 1
    segs: list[Any] = [None] * len(unique)
    logits: list[torch.Tensor | None] = [None] * len(unique)
    # Padding the new tokens is what costs compute (a judge prompt next to one-token expansion rows).
    for group in length_buckets([len(t) for _, t, _ in unique], max_rows):
        want = any(unique[i][2] for i in group)
        t0 = time.perf_counter()
        out_segs, out_logits = backend.extend([unique[i][:2] for i in group], want_cache=want)
        timings.forward_s += time.perf_counter() - t0
        timings.forwards += 1
        for j, i in enumerate(group):
            logits[i] = out_logits[j]
            segs[i] = out_segs[j] if out_segs is not None else None
    replies, k = [], 0
    for req in requests:
        ids = keys[k : k + len(req.rows)]
        k += len(req.rows)
        replies.append(
            ([segs[i] for i in ids] if req.want_cache else None, torch.stack([logits[i] for i in ids]))
        )
    return replies


def run_lockstep(
    searches: list[Generator],
    backend: Backend,
    embed: Callable[[list[str]], torch.Tensor],
    score: Callable[[list[str], list[str]], torch.Tensor] | None = None,
    max_rows: int = 256,
    timings: Timings | None = None,
) -> list[Any]:
    """Drive the searches to completion, serving each round's requests in batches; -> their return values."""
    timings = timings if timings is not None else Timings()
    results: list[Any] = [None] * len(searches)
    pending: dict[int, Any] = {}

    def advance(i: int, reply: Any, first: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            pending[i] = next(searches[i]) if first else searches[i].send(reply)
        except StopIteration as stop:
            results[i] = stop.value
            pending.pop(i, None)
        timings.search_s += time.perf_counter() - t0

    for i in range(len(searches)):
        advance(i, None, first=True)
    while pending:
        timings.rounds += 1
        live = dict(pending)
        ext = [i for i, r in live.items() if isinstance(r, Extend)]
        emb = [i for i, r in live.items() if isinstance(r, Embed)]
        sco = [i for i, r in live.items() if isinstance(r, Score)]
        replies: dict[int, Any] = {}
        if ext:
            for i, reply in zip(
                ext, serve_extend(backend, [live[i] for i in ext], max_rows, timings), strict=True
            ):
                replies[i] = reply
        if emb:
            texts = sorted({t for i in emb for t in live[i].texts})
            t0 = time.perf_counter()
            vectors = dict(zip(texts, embed(texts), strict=True))
            timings.embed_s += time.perf_counter() - t0
            for i in emb:
                replies[i] = torch.stack([vectors[t] for t in live[i].texts])
        if sco:
            pairs = [p for i in sco for p in live[i].pairs]
            t0 = time.perf_counter()
            scores = score([p for p, _ in pairs], [r for _, r in pairs])
            timings.score_s += time.perf_counter() - t0
            k = 0
            for i in sco:
                replies[i] = scores[k : k + len(live[i].pairs)]
                k += len(live[i].pairs)
        for i, reply in replies.items():
            advance(i, reply)
    return results
