"""RAIN's search tree: nodes, selection, priors, backup with similarity updates, dynamic addition, commit.

Pure bookkeeping, no model: every function here is a function of node statistics and embeddings, unit-tested
against hand-computed values (tests/unit/rain/test_tree.py). Semantics follow the authors' released code
(SafeAILab/RAIN, HH/main.py and nodes.py); see docs/rain.md for where it differs from the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# The code normalises q with the root's running min/max of q, initialised to -1 and 1. Values stay in [-1, 1],
# so these never move: qh = (q + 1) / (2 + 1e-5).
MIN_Q, MAX_Q = -1.0, 1.0


@dataclass(eq=False)
class Node:
    """One token set appended to its parent's state (the root: the committed state, tokens=())."""

    tokens: tuple[int, ...] = ()  # the token set
    p: float = 0.0  # prior
    depth: int = 0  # distance from the FIRST root: picks the token-set length of this node's children
    parent: Node | None = None
    # insertion order breaks ties (first = greedy; at the 1-token level the lowest id under child_order=token_id)
    children: list[Node] = field(default_factory=list)
    n: float = 0.0  # visits; fractional after similarity updates
    fn: int = 0  # real visits only
    q: float = 0.0  # mean backed-up value in [-1, 1]
    emb: torch.Tensor | None = None  # running mean of this node's path-text embeddings [D]
    # Filled when the node's state is computed (opaque to the tree; owned by alignlab.rain.search):
    cache: Any = None  # the model's cached state for this node's tokens (a KV segment, or tokens for a stub)
    logits: torch.Tensor | None = None  # next-token logits after this node's state [V]
    # What dynamic addition needs from the expansion that created the children:
    ranked: list[tuple[int, float]] | None = (
        None  # 1-token level: (token, prob) by falling prob, full softmax
    )
    raw_priors: list[float] = field(default_factory=list)  # multi-token level: children's unnormalised priors

    def path_from(self, ancestor: Node) -> list[Node]:
        """[ancestor, ..., self] (self must descend from ancestor)."""
        path = [self]
        while path[-1] is not ancestor:
            path.append(path[-1].parent)
        return path[::-1]


def token_set_length(depth: int, lengths: list[int]) -> int:
    """Length of the token sets a node at `depth` expands into: lengths[min(depth, len - 1)] (1, 2, 4, 10)."""
    return lengths[min(depth, len(lengths) - 1)]


# ------------------------------------------------------------------------------------------------ selection


def selection_score(child: Node, parent_n: float, c: float) -> float:
    """qh + u with qh = 0 if n == 0 else (q - minq) / (maxq - minq + 1e-5), u = c * p * sqrt(parent.n) / (1 + n).

    The paper's Eq. 1 sums the siblings' visits under the root; the code uses the parent's n (followed here).
    """
    qh = 0.0 if child.n == 0 else (child.q - MIN_Q) / (MAX_Q - MIN_Q + 1e-5)
    return qh + c * child.p * math.sqrt(parent_n) / (1 + child.n)


def select_child(node: Node, c: float) -> Node:
    """The child maximising selection_score; ties go to the first inserted (Python's max keeps the first)."""
    return max(node.children, key=lambda ch: selection_score(ch, node.n, c))


# ------------------------------------------------------------------------------------------------ priors


def normalise(ps: list[float]) -> list[float]:
    total = sum(ps)
    return [p / total for p in ps]


def mix_priors(ps: list[float], mix: float) -> list[float]:
    """(1 - mix) * p + mix / K, renormalised (the code applies it to root priors: exploration at the root)."""
    k = len(ps)
    return normalise([(1 - mix) * p + mix / k for p in ps])


def clamp_greedy_prior(greedy: float, sampled: list[float]) -> float:
    """The greedy set's raw prior clamped into [max + min, sum] of the sampled ones', so it ranks first.

    (The code applies min(greedy, sum) then max(., max + min); with no sampled set the greedy keeps its own.)
    """
    if not sampled:
        return greedy
    return max(min(greedy, sum(sampled)), max(sampled) + min(sampled))


def attach_children(
    node: Node, token_sets: list[tuple[int, ...]], raw: list[float], mix: float | None
) -> None:
    """Add children with priors raw / sum(raw), mixed when `mix` is given (the node is the root)."""
    ps = normalise(raw)
    if mix is not None:
        ps = mix_priors(ps, mix)
    node.raw_priors = list(raw)
    for tokens, p in zip(token_sets, ps, strict=True):
        node.children.append(Node(tokens=tokens, p=p, depth=node.depth + 1, parent=node))


def remix_after_commit(new_root: Node, mix: float) -> None:
    """The committed child becomes the root, keeps its subtree, and its children's priors are re-mixed."""
    new_root.parent = None
    if new_root.children:
        for ch, p in zip(new_root.children, mix_priors([ch.p for ch in new_root.children], mix), strict=True):
            ch.p = p


# ------------------------------------------------------------------------------------------------ backup


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.unsqueeze(0).float(), b.unsqueeze(0).float()).item()


def backup(
    path: list[Node],
    g: float,
    embeddings: list[torch.Tensor | None],
    *,
    gamma: float,
    threshold: float,
    similarity_update: bool,
) -> tuple[int, list[float]]:
    """Back up value g along path = [root, ..., leaf] (no discount) -> (sibling updates, every sibling cosine
    computed, in order: what the threshold acted on; none when similarity_update is off).

    embeddings[i]: the embedding of path[i]'s path text (its tokens + the descendants' on this path + the rollout;
    None for the root). Per node, leaf first as the code's recursion does: n += 1, fn += 1; running-mean
    embedding; every sibling with an embedding and cos(self.emb, sib.emb) >= threshold gets w = gamma * cos:
    sib.q = (sib.q * sib.n + w * g) / (sib.n + w), sib.n += w (sib.fn unchanged). Then q += (g - q) / n.
    """
    updates, cosines = 0, []
    for node, e in zip(reversed(path), reversed(embeddings), strict=True):
        node.n += 1
        node.fn += 1
        if node.parent is None:
            continue
        node.emb = e.clone() if node.emb is None else node.emb + (e - node.emb) / node.fn
        if not similarity_update:
            continue
        for sib in node.parent.children:
            if sib is node or sib.emb is None:
                continue
            cos = cosine(node.emb, sib.emb)
            cosines.append(cos)
            if cos < threshold:
                continue
            w = gamma * cos
            sib.q = (sib.q * sib.n + w * g) / (sib.n + w)
            sib.n += w
            updates += 1
    for node in path:  # each node's own q update touches only itself: order is irrelevant
        node.q += (g - node.q) / node.n
    return updates, cosines


# ------------------------------------------------------------------------------------------------ dynamic addition


@dataclass(frozen=True)
class AdditionCheck:
    """One dynamic-addition check at an internal node: what the variance threshold acted on, and the verdict."""

    fires: bool  # all four conditions hold
    norm: float | None = None  # ||var(child embeddings)||; None when not computed (see addition_check)
    threshold: float | None = None  # var_coef * length, alongside norm
    length: int | None = None  # len(first child's tokens), alongside norm


def addition_check(node: Node, max_children: int, var_coef: float) -> AdditionCheck:
    """All four hold: < max_children children; every child has an embedding; ||var(child embeddings)|| (the
    per-dimension unbiased variance, torch.var's default) < var_coef * len(first child's tokens); every child q < 0.

    The children all look alike and all look bad: the search needs something new to try. The norm is computed
    (and returned) only when the first two hold and there are >= 2 children, as the code computes it.
    """
    kids = node.children
    # One child: the unbiased variance of one sample is NaN, and NaN < x is False in the code too.
    if len(kids) < 2 or len(kids) >= max_children or any(ch.emb is None for ch in kids):
        return AdditionCheck(False)
    norm = torch.norm(torch.var(torch.stack([ch.emb for ch in kids]), dim=0)).item()
    length = len(kids[0].tokens)
    threshold = var_coef * length
    return AdditionCheck(norm < threshold and max(ch.q for ch in kids) < 0, norm, threshold, length)


def wants_addition(node: Node, max_children: int, var_coef: float) -> bool:
    """addition_check's verdict alone."""
    return addition_check(node, max_children, var_coef).fires


def next_ranked_token(node: Node) -> tuple[int, float] | None:
    """1-token level: the most probable token not yet a child, with its prior renormalised over the top
    len(children) + 1 tokens of the node's next-token distribution (the code's top-k warper with k = nc + 1).

    node.ranked is by falling probability whatever the children's order (child_order), so the token added is
    the next by probability either way, as the code's top-(nc + 1) of the stored logits."""
    have = {ch.tokens for ch in node.children}
    k = len(node.children) + 1
    top = node.ranked[:k]
    total = sum(p for _, p in top)
    for tok, p in top:
        if (tok,) not in have:
            return tok, p / total
    return None


def add_child(node: Node, tokens: tuple[int, ...], p: float, is_root: bool, mix: float) -> Node | None:
    """Append one child (None when `tokens` is already a child). At the root its prior is mixed with K = nc + 1."""
    if any(ch.tokens == tokens for ch in node.children):
        return None
    if is_root:
        p = (1 - mix) * p + mix / (len(node.children) + 1)
    child = Node(tokens=tokens, p=p, depth=node.depth + 1, parent=node)
    node.children.append(child)
    return child


# ------------------------------------------------------------------------------------------------ commit, stopping


def best_child(root: Node) -> Node | None:
    """The most visited child (largest n), ties broken by larger q, then by insertion order."""
    if not root.children:
        return None
    top = max(ch.n for ch in root.children)
    return max((ch for ch in root.children if ch.n == top), key=lambda ch: ch.q)


def should_stop(root: Node, T_m: int, V: float) -> bool:
    """Stop searching early iff the most visited root child has fn > T_m and q > V."""
    best = best_child(root)
    return best is not None and best.fn > T_m and best.q > V


def search_range(inherited_fn: int, T: int) -> range:
    """The iterations of one commit: range(fn, max(T, fn + 15)) with fn the new root's inherited real visits."""
    return range(inherited_fn, max(T, inherited_fn + 15))


def sample_by_visits(root: Node, u: float) -> Node:
    """The paper's commit rule (an option): a child drawn with probability n / sum(n), by inverse CDF at u."""
    total = sum(ch.n for ch in root.children)
    acc = 0.0
    for ch in root.children:
        acc += ch.n / total
        if u < acc:
            return ch
    return root.children[-1]
