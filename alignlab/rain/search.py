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
from alignlab.rain.stage_config import EMBEDDER_THRESHOLDS
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
    child_order: str
    eos_rule: str
    proposal_temperature: float
    proposal_attempts_per_candidate: int
    turn_marker: str  # RainConfig's judge.turn_marker

    def __post_init__(self):
        if self.child_order not in ("probability", "token_id"):
            raise ValueError(f"stage.child_order must be probability or token_id, got {self.child_order!r}")
        if self.eos_rule not in ("stop", "continue"):
            raise ValueError(f"stage.eos_rule must be stop or continue, got {self.eos_rule!r}")
        if not self.proposal_temperature > 0:
            raise ValueError(f"stage.proposal_temperature must be > 0, got {self.proposal_temperature}")
        if self.proposal_attempts_per_candidate < 1:
            raise ValueError(
                f"stage.proposal_attempts_per_candidate must be >= 1, got {self.proposal_attempts_per_candidate}"
            )

    @classmethod
    def from_fields(cls, values: Mapping[str, Any], **overrides: Any) -> RainParams:
        """The params named in `values` (a stage=rain config, or asdict(RainConfig())), turn_marker from its
        judge, then `overrides`; a null threshold is its embedder's (values["embedder"]); sequences become tuples."""
        picked = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        picked.setdefault("turn_marker", values["judge"]["turn_marker"])
        picked |= overrides
        # null thresholds: the embedder's (EMBEDDER_THRESHOLDS, the one place their values are written)
        for i, key in enumerate(("sim_threshold", "dynamic_var_coef")):
            if picked.get(key) is None:
                picked[key] = EMBEDDER_THRESHOLDS[values["embedder"]][i]
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
    # How often the two embedding thresholds were checked and how often they fired, and the values they acted on
    # (for calibrating sim_threshold and dynamic_var_coef to an embedder):
    # sibling cosines computed in backups (similarity_update on; siblings with an embedding)
    similarity_checks: int = 0
    similarity_updates: int = 0  # ... of which at cos >= sim_threshold: sibling updates made
    sibling_cosines: list[float] = field(default_factory=list)  # every one of those cosines, in order
    # descents through a node with 2 <= K < dynamic_max_children children, all embedded (dynamic_addition on):
    # the checks where ||var|| is computed
    addition_checks: int = 0
    addition_triggers: int = 0  # ... of which all four conditions held (||var|| < threshold and every q < 0)
    var_norms: list[float] = field(default_factory=list)  # ||var(child embeddings)|| at every such check
    # dynamic_var_coef * len(first child's set) at each of those checks (aligned with var_norms)
    var_thresholds: list[float] = field(default_factory=list)
    var_set_lengths: list[int] = field(default_factory=list)  # that set length at each check (aligned)
    dynamic_additions: int = 0  # children added (a trigger adds none when its proposal is already a child)
    rows: int = 0  # model rows this prompt requested
    tokens: int = 0  # new token positions this prompt requested
    tokens_by_purpose: dict[str, int] = field(default_factory=dict)


@dataclass
class SearchResult:
    # committed tokens: eos_rule=stop, up to and including EOS when committed; continue, EOS may sit inside
    answer_ids: list[int]
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

    eos_stops = P.eos_rule == "stop"

    def ended(answer: list[int]) -> bool:
        """The answer can go no further: the length budget, the next-turn marker, or (eos_rule=stop) EOS."""
        if len(answer) >= P.max_new_tokens or (eos_stops and codec.eos_id in answer):
            return True
        return any(s in codec.decode(answer) for s in P.stop_strings)

    def terminal_leaf(path: list[Node], state: list[int]) -> bool:
        """Evaluated, never expanded: the answer ended, or (eos_rule=continue) the leaf's own set holds EOS. The
        code checks the last action of this descent: a root has none (even a committed set with EOS), so a leaf
        root is expanded."""
        return ended(state) or (not eos_stops and len(path) > 1 and codec.eos_id in path[-1].tokens)

    def prefix_of(path: list[Node]) -> tuple[Any, ...]:
        return (root_seg, *(n.cache for n in path[1:]))

    # ---- a node's children, each with its cache segment and next-token logits (unless terminal) ------------
    def compute_children(kids: list[Node], prefix, answer: list[int], purpose: str, partial=None):
        """Cache segment and next-token logits of each non-terminal child. partial: token tuple -> the segment
        already computed for that start of a child's set (sample_sets keeps them), so only the rest is run."""
        partial = partial or {}
        # eos_rule=continue: a child whose set holds EOS needs its logits too (its rollout, and its expansion
        # should it be committed)
        todo = [ch for ch in kids if not ended(answer + list(ch.tokens))]
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

    def sample_sets(logits: torch.Tensor, prefix, L: int, u: np.ndarray, greedy: bool, state=None):
        """Token sets of length L (eos_rule=stop: shorter when EOS is drawn): the greedy one first when `greedy`,
        then one per row of u [attempts, L]. Each step samples from softmax(logits / proposal_temperature)
        truncated to the top k. -> ([(tokens, raw p)], state).

        Rows that share their tokens so far share one model row (identical computation). state: token tuple ->
        (cache segment, logits) after it, kept across calls on the same node (pass it back in).
        """
        n_rows = len(u) + int(greedy)
        seqs: list[list[int]] = [[] for _ in range(n_rows)]
        logp = [0.0] * n_rows
        if state is None:
            state = {(): (None, logits)}
        for step in range(L):
            live = [r for r in range(n_rows) if not (eos_stops and seqs[r] and seqs[r][-1] == codec.eos_id)]
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
                probs = top_k_probs(
                    next_token_probs(state[tuple(seqs[r])][1], P.proposal_temperature), P.top_k
                )
                tok = (
                    int(torch.argmax(probs))
                    if greedy and r == 0
                    else sample_index(probs, u[r - greedy, step])
                )
                logp[r] += math.log(probs[tok].item())
                seqs[r].append(tok)
        sets = [(tuple(s), math.exp(lp)) for s, lp in zip(seqs, logp, strict=True)]
        return sets, state

    def new_sets(sets, seen: set) -> list:
        """The sets not in `seen`, first occurrence only (each is added to seen): duplicates are dropped."""
        out = []
        for s, p in sets:
            if s not in seen:
                seen.add(s)
                out.append((s, p))
        return out

    def sample_distinct(logits, prefix, L: int, want: int, attempts: int, seen: set, state):
        """Sampled attempts (no greedy row) until `want` sets not in `seen`, or `attempts` attempts: the code's
        one-at-a-time loop with its early break. Each round draws only as many attempts as sets are still
        missing, so no attempt is drawn that the loop would not make, and the uniforms come in its order."""
        found = []
        while attempts > 0 and len(found) < want:
            k = min(want - len(found), attempts)
            sets, state = yield from sample_sets(
                logits, prefix, L, rng.random((k, L)), greedy=False, state=state
            )
            found += new_sets(sets, seen)
            attempts -= k
        return found, state

    def segments(state) -> dict[tuple[int, ...], Any]:
        """sample_sets's state -> the cache segment of every computed start of a set (compute_children's partial)."""
        return {k: seg for k, (seg, _) in state.items() if seg is not None}

    # ---- expansion -------------------------------------------------------------------------------------------
    def expand(leaf: Node, path: list[Node], answer: list[int]):
        L = tree.token_set_length(leaf.depth, list(P.token_set_lengths))
        mix = P.root_mix if leaf.parent is None else None
        if L == 1:
            # ranked stays by probability at temperature 1 (dynamic addition reads it); the children are the top
            # n_candidates, listed as child_order says, with priors at the proposal temperature
            probs = next_token_probs(leaf.logits)
            leaf.ranked = ranked_tokens(probs, max(P.n_candidates, P.dynamic_max_children))
            top = [t for t, _ in leaf.ranked[: P.n_candidates]]
            if P.child_order == "token_id":
                top.sort()
            tempered = next_token_probs(leaf.logits, P.proposal_temperature)
            tree.attach_children(leaf, [(t,) for t in top], [tempered[t].item() for t in top], mix)
            partial = {}
        else:
            # The greedy set, then sampled attempts until n_candidates - 1 distinct new sets, at most
            # proposal_attempts_per_candidate * n_candidates - 1 attempts (HH: 9, never early; adv/: 19). The
            # first round runs with the greedy row.
            want = P.n_candidates - 1
            attempts = P.proposal_attempts_per_candidate * P.n_candidates - 1
            u = rng.random((want, L))
            sets, state = yield from sample_sets(leaf.logits, prefix_of(path), L, u, greedy=True)
            greedy, seen = sets[0], {sets[0][0]}
            sampled = new_sets(sets[1:], seen)
            more, state = yield from sample_distinct(
                leaf.logits, prefix_of(path), L, want - len(sampled), attempts - want, seen, state
            )
            sampled += more
            raw = [tree.clamp_greedy_prior(greedy[1], [p for _, p in sampled])] + [p for _, p in sampled]
            tree.attach_children(leaf, [greedy[0]] + [s for s, _ in sampled], raw, mix)
            partial = segments(state)
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
            # The code's group_getp(topk=2): attempts (2 * proposal_attempts_per_candidate - 1 of them) until one
            # differs from the greedy set, the node's first child; none may (then nothing is added).
            found, state = yield from sample_distinct(
                node.logits, prefix_of(path), L, 1, 2 * P.proposal_attempts_per_candidate - 1,
                {node.children[0].tokens}, None,
            )  # fmt: skip
            partial = segments(state) if state is not None else {}
            child = None
            if found:
                [(s, raw)] = found
                p = raw / (sum(node.raw_priors) + raw)
                child = tree.add_child(node, s, p, is_root, P.root_mix)
                if child is not None:
                    node.raw_priors.append(raw)
        if child is not None:
            stats.dynamic_additions += 1
            yield from compute_children([child], prefix_of(path), answer, "add", partial)

    # ---- self-evaluation: rollout to the next punctuation, then judge the current exchange -------------------
    def rollout_stop(full: list[int], toks: list[int]) -> bool:
        """The code's rollout loop condition: length budget, EOS (stop: anywhere in the answer; continue: only a
        sampled one, as HH's simg), punctuation at the end of the text, next-turn marker."""
        if len(full) >= P.max_new_tokens:
            return True
        if codec.eos_id in (full if eos_stops else toks[-1:]):
            return True
        text = codec.decode(full)
        return rollout_done(text or prompt, P.rollout_stops) or any(s in text for s in P.stop_strings)

    def rollout(leaf: Node, path: list[Node], answer: list[int]):
        """Sample (temperature 1, full distribution) from the leaf until rollout_stop; -> the rollout tokens."""
        toks: list[int] = []
        logits, seg = leaf.logits, None
        while not rollout_stop(answer + toks, toks):
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
            if P.dynamic_addition:
                check = tree.addition_check(node, P.dynamic_max_children, P.dynamic_var_coef)
                if check.norm is not None:
                    stats.addition_checks += 1
                    stats.var_norms.append(check.norm)
                    stats.var_thresholds.append(check.threshold)
                    stats.var_set_lengths.append(check.length)
                if check.fires:
                    stats.addition_triggers += 1
                    yield from add_dynamic(node, path, answer + [t for n in path[1:] for t in n.tokens])
            node = tree.select_child(node, P.c)
            path.append(node)
        state = answer + [t for n in path[1:] for t in n.tokens]
        toks = yield from rollout(node, path, state)
        v = yield from evaluate(state + toks)
        if not terminal_leaf(path, state):
            yield from expand(node, path, state)
        embs = yield from embed_path(path, toks)
        updates, cosines = tree.backup(
            path,
            v,
            embs,
            gamma=P.gamma,
            threshold=P.sim_threshold,
            similarity_update=P.similarity_update,
        )
        stats.similarity_updates += updates
        stats.similarity_checks += len(cosines)
        stats.sibling_cosines += cosines
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
        if ended(answer):  # eos_rule=continue: a committed EOS does not end the answer
            root = child
            break
        root_seg = root_seg + child.cache  # the committed state's cache: one segment again
        tree.remix_after_commit(child, P.root_mix)
        root = child
    return SearchResult(answer_ids=answer, stats=stats, root=root, commits=commits)
