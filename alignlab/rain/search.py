"""The RAIN loop for one prompt, written as a generator of model requests.

`rain_search` reads as the algorithm (outer loop: search, commit, repeat; one search: descend, evaluate, expand,
back up) and never calls a model: it yields Extend / Embed / Score requests and receives their results.
alignlab.rain.lockstep serves the requests of many prompts together, so the forwards of several prompts' trees
share batches while each prompt's choices stay its own (its uniforms come from its own generator).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from alignlab.rain import tree
from alignlab.rain.evaluator import Codec, JudgeFormat, current_exchange, cut_at_stops, rollout_done
from alignlab.rain.proposal import next_token_probs, ranked_tokens, sample_index, top_k_probs
from alignlab.rain.requests import Embed, Extend, Score
from alignlab.rain.tree import Node


@dataclass(frozen=True)
class RainParams:
    """The search's hyperparameters as plain values: RainConfig's search fields, whose defaults and docs live in
    alignlab/rain/stage_config.py only (build one with from_fields)."""

    c: float
    gamma: float
    sim_threshold: float
    T: int
    T_m: int
    V: float
    n_candidates: int
    top_k: int
    token_set_lengths: tuple[int, ...]
    root_mix: float
    dynamic_addition: bool
    dynamic_max_children: int
    dynamic_var_coef: float
    similarity_update: bool
    commit: str
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    rollout_stops: str
    turn_marker: str  # RainConfig's judge.turn_marker

    @classmethod
    def from_fields(cls, values: Mapping[str, Any], **overrides: Any) -> RainParams:
        """The params named in `values` (a stage=rain config, or asdict(RainConfig())), turn_marker from its
        judge, then `overrides`; sequences become tuples."""
        picked = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        picked.setdefault("turn_marker", values["judge"]["turn_marker"])
        picked |= overrides
        tuples = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in picked.items()})


@dataclass
class SearchStats:
    iterations: int = 0  # search iterations (each ends by rewinding to the root)
    rewinds: int = 0  # iterations whose leaf was judged harmful (v < 0): a continuation the search backed off
    commits: int = 0  # token sets committed
    overrides: int = 0  # commits of a child other than the highest-prior one (where RAIN departs from greedy)
    early_stops: int = 0  # commits decided by the fn > T_m and q > V rule before the iteration budget ran out
    evaluations: int = 0  # judge (or reward-model) calls made
    memo_hits: int = 0  # evaluations answered from the memo of exact texts
    similarity_updates: int = 0  # sibling updates at cos >= threshold
    dynamic_additions: int = 0  # children added by dynamic node addition
    rows: int = 0  # model rows this prompt requested
    tokens: int = 0  # new token positions this prompt requested
    tokens_by_purpose: dict[str, int] = field(default_factory=dict)


@dataclass
class SearchResult:
    answer_ids: list[int]  # committed tokens (up to and including EOS when committed)
    stats: SearchStats
    root: Node  # the final root (tests compare trees)
    commits: list[dict] = field(default_factory=list)  # per commit: tokens, n, q, fn of the chosen child


Request = Extend | Embed | Score


def rain_search(
    prompt: str,
    *,
    params: RainParams,
    codec: Codec,
    judge: JudgeFormat | None,
    judge_prefix: tuple[Any, ...],
    judge_prefix_ids: list[int],
    rng: np.random.Generator,
    use_reward_model: bool = False,
    first_root: list[Node] | None = None,
) -> Generator[Request, Any, SearchResult]:
    """RAIN on one prompt. judge_prefix: the cached segment(s) of the judge preamble (judge_prefix_ids its tokens).

    first_root, when given, receives the initial root (tests inspect the tree after a budget of iterations).
    """
    P = params
    stats = SearchStats()
    exchange = current_exchange(prompt, P.turn_marker)
    memo_v: dict[str, float] = {}
    memo_e: dict[str, torch.Tensor] = {}

    def extend(rows, purpose, want_cache=True):
        stats.rows += len(rows)
        n = sum(len(t) for _, t in rows)
        stats.tokens += n
        stats.tokens_by_purpose[purpose] = stats.tokens_by_purpose.get(purpose, 0) + n
        return Extend(rows, want_cache, purpose)

    def terminal(answer: list[int]) -> bool:
        """The answer ends here: EOS, the next-turn marker, or the length budget."""
        if codec.eos_id in answer or len(answer) >= P.max_new_tokens:
            return True
        return any(s in codec.decode(answer) for s in P.stop_strings)

    def prefix_of(path: list[Node]) -> tuple[Any, ...]:
        return (root_seg, *(n.cache for n in path[1:]))

    # ---- a node's children, each with its cache segment and next-token logits (unless terminal) ------------
    def compute_children(kids: list[Node], prefix, answer: list[int], purpose: str, partial=None):
        """Cache segment and next-token logits of each non-terminal child. partial: token tuple -> the segment
        already computed for that start of a child's set (sample_sets keeps them), so only the rest is run."""
        partial = partial or {}
        todo = [ch for ch in kids if not terminal(answer + list(ch.tokens))]
        if not todo:
            return
        rows, heads = [], []
        for ch in todo:
            cut = max((k for k in range(len(ch.tokens)) if ch.tokens[:k] in partial), default=0)
            head = partial.get(ch.tokens[:cut])
            heads.append(head)
            rows.append(((*prefix, head) if head is not None else prefix, list(ch.tokens[cut:])))
        segs, logits = yield extend(rows, purpose)
        for ch, head, seg, lg in zip(todo, heads, segs, logits, strict=True):
            ch.cache, ch.logits = (seg if head is None else head + seg), lg

    def sample_sets(logits: torch.Tensor, prefix, L: int, u: np.ndarray, greedy: bool):
        """Token sets of length L (shorter when EOS is drawn): the greedy one first when `greedy`, then one per
        row of u [attempts, L]. Each step samples from the top-k truncated distribution. -> [(tokens, raw p)].

        Rows that share their tokens so far share one model row (identical computation).
        """
        n_rows = len(u) + int(greedy)
        seqs: list[list[int]] = [[] for _ in range(n_rows)]
        logp = [0.0] * n_rows
        state: dict[tuple[int, ...], tuple[Any, torch.Tensor]] = {(): (None, logits)}
        for step in range(L):
            live = [r for r in range(n_rows) if not seqs[r] or seqs[r][-1] != codec.eos_id]
            if step > 0:  # logits after each distinct live sequence, one row each
                need = sorted({tuple(seqs[r]) for r in live} - state.keys())
                if need:
                    rows = []
                    for s in need:
                        seg = state[s[:-1]][0]
                        rows.append(((*prefix, seg) if seg is not None else prefix, [s[-1]]))
                    segs, lg = yield extend(rows, "expand")
                    for s, seg, row_logits in zip(need, segs, lg, strict=True):
                        prev = state[s[:-1]][0]
                        state[s] = (seg if prev is None else prev + seg, row_logits)
            for r in live:
                probs = top_k_probs(next_token_probs(state[tuple(seqs[r])][1]), P.top_k)
                tok = (
                    int(torch.argmax(probs))
                    if greedy and r == 0
                    else sample_index(probs, u[r - greedy, step])
                )
                logp[r] += math.log(probs[tok].item())
                seqs[r].append(tok)
        sets = [(tuple(s), math.exp(lp)) for s, lp in zip(seqs, logp, strict=True)]
        return sets, {k: seg for k, (seg, _) in state.items() if seg is not None}

    # ---- expansion -------------------------------------------------------------------------------------------
    def expand(leaf: Node, path: list[Node], answer: list[int]):
        L = tree.token_set_length(leaf.depth, list(P.token_set_lengths))
        mix = P.root_mix if leaf.parent is None else None
        probs = next_token_probs(leaf.logits)
        if L == 1:
            leaf.ranked = ranked_tokens(probs, max(P.n_candidates, P.dynamic_max_children))
            top = leaf.ranked[: P.n_candidates]
            tree.attach_children(leaf, [(t,) for t, _ in top], [p for _, p in top], mix)
            partial = {}
        else:
            u = rng.random((P.n_candidates - 1, L))
            sets, partial = yield from sample_sets(leaf.logits, prefix_of(path), L, u, greedy=True)
            greedy, sampled, seen = sets[0], [], {sets[0][0]}
            for s, p in sets[1:]:
                if s not in seen:
                    seen.add(s)
                    sampled.append((s, p))
            raw = [tree.clamp_greedy_prior(greedy[1], [p for _, p in sampled])] + [p for _, p in sampled]
            tree.attach_children(leaf, [greedy[0]] + [s for s, _ in sampled], raw, mix)
        yield from compute_children(leaf.children, prefix_of(path), answer, "expand", partial)

    # ---- dynamic node addition at an internal node during descent --------------------------------------------
    def add_dynamic(node: Node, path: list[Node], answer: list[int]):
        is_root = node.parent is None
        L = tree.token_set_length(node.depth, list(P.token_set_lengths))
        if L == 1:
            nxt = tree.next_ranked_token(node)
            child = tree.add_child(node, (nxt[0],), nxt[1], is_root, P.root_mix) if nxt else None
            partial = {}
        else:
            [(s, raw)], partial = yield from sample_sets(
                node.logits, prefix_of(path), L, rng.random((1, L)), greedy=False
            )
            p = raw / (sum(node.raw_priors) + raw)
            child = tree.add_child(node, s, p, is_root, P.root_mix)
            if child is not None:
                node.raw_priors.append(raw)
        if child is not None:
            stats.dynamic_additions += 1
            yield from compute_children([child], prefix_of(path), answer, "add", partial)

    # ---- self-evaluation: rollout to the next punctuation, then judge the current exchange -------------------
    def rollout_stop(full: list[int]) -> bool:
        """The code's rollout loop condition: length budget, EOS, punctuation at the end, next-turn marker."""
        if len(full) >= P.max_new_tokens or codec.eos_id in full:
            return True
        text = codec.decode(full)
        return rollout_done(text or prompt, P.rollout_stops) or any(s in text for s in P.stop_strings)

    def rollout(leaf: Node, path: list[Node], answer: list[int]):
        """Sample (temperature 1, full distribution) from the leaf until rollout_stop; -> the rollout tokens."""
        toks: list[int] = []
        logits, seg = leaf.logits, None
        while not rollout_stop(answer + toks):
            if toks:  # logits after the last sampled token (the leaf's own are cached on the node)
                prefix = prefix_of(path) if seg is None else (*prefix_of(path), seg)
                segs, lg = yield extend([(prefix, [toks[-1]])], "rollout")
                seg, logits = (segs[0] if seg is None else seg + segs[0]), lg[0]
            toks.append(sample_index(next_token_probs(logits), rng.random()))
        return toks

    def evaluate(full: list[int]):
        response = cut_at_stops(codec.decode(full), list(P.stop_strings))
        dialogue = exchange + response
        if dialogue in memo_v:
            stats.memo_hits += 1
            return memo_v[dialogue]
        stats.evaluations += 1
        if use_reward_model:
            (score,) = (yield Score([(prompt, response)])).tolist()
            v = math.tanh(score)
        else:
            texts, slots = zip(*judge.prompts(dialogue), strict=True)
            rows = []
            for text in texts:
                ids = codec.encode(text)
                if ids[: len(judge_prefix_ids)] == judge_prefix_ids and len(ids) > len(judge_prefix_ids):
                    rows.append((judge_prefix, ids[len(judge_prefix_ids) :]))
                else:  # the preamble tokenised differently here: run the whole prompt
                    rows.append(((), ids))
            _, logits = yield extend(rows, "judge", want_cache=False)
            v = judge.value(logits, list(slots))
        memo_v[dialogue] = v
        return v

    def embed_path(path: list[Node], rollout_toks: list[int]):
        """Embeddings of every non-root node's path text (its tokens + the descendants' + the rollout)."""
        texts, suffix = [], list(rollout_toks)
        for node in reversed(path[1:]):
            suffix = list(node.tokens) + suffix
            texts.append(codec.decode(suffix))
        texts.reverse()
        missing = sorted({t for t in texts if t not in memo_e})
        if missing:
            embs = yield Embed(missing)
            memo_e.update(zip(missing, embs, strict=True))
        return [None] + [memo_e[t] for t in texts]

    # ---- one search iteration --------------------------------------------------------------------------------
    def search_once(root: Node, answer: list[int]):
        node, path = root, [root]
        while node.children:
            if P.dynamic_addition and tree.wants_addition(node, P.dynamic_max_children, P.dynamic_var_coef):
                yield from add_dynamic(node, path, answer + [t for n in path[1:] for t in n.tokens])
            node = tree.select_child(node, P.c)
            path.append(node)
        state = answer + [t for n in path[1:] for t in n.tokens]
        toks = yield from rollout(node, path, state)
        v = yield from evaluate(state + toks)
        if not terminal(state):
            yield from expand(node, path, state)
        embs = yield from embed_path(path, toks)
        stats.similarity_updates += tree.backup(
            path,
            v,
            embs,
            gamma=P.gamma,
            threshold=P.sim_threshold,
            similarity_update=P.similarity_update,
        )
        stats.iterations += 1
        stats.rewinds += int(v < 0)

    # ---- outer loop: search, commit the best child, keep its subtree, repeat ---------------------------------
    prompt_ids = codec.encode(prompt)
    segs, logits = yield extend([((), prompt_ids)], "root")
    root_seg = segs[0]
    root = Node(logits=logits[0])
    if first_root is not None:
        first_root.append(root)
    answer: list[int] = []
    commits: list[dict] = []
    while True:
        for _ in tree.search_range(root.fn, P.T):
            yield from search_once(root, answer)
            if tree.should_stop(root, P.T_m, P.V):
                stats.early_stops += 1
                break
        if not root.children:
            break
        child = tree.best_child(root) if P.commit == "argmax" else tree.sample_by_visits(root, rng.random())
        stats.commits += 1
        stats.overrides += int(child is not max(root.children, key=lambda ch: ch.p))
        commits.append({"tokens": list(child.tokens), "n": child.n, "fn": child.fn, "q": child.q})
        answer += child.tokens
        if terminal(answer):
            root = child
            break
        root_seg = root_seg + child.cache  # the committed state's cache: one segment again
        tree.remix_after_commit(child, P.root_mix)
        root = child
    return SearchResult(answer_ids=answer, stats=stats, root=root, commits=commits)
