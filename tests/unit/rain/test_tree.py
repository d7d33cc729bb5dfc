"""RAIN's tree bookkeeping against hand-computed values (the project's RAIN spec, "Tests that pin faithfulness" 1, 2, 4-6)."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.rain import tree
from alignlab.rain.tree import Node


def family(*specs) -> tuple[Node, list[Node]]:
    """A parent with children built from (tokens, p, n, fn, q) tuples."""
    parent = Node(n=sum(s[2] for s in specs))
    for tokens, p, n, fn, q in specs:
        parent.children.append(Node(tokens=tokens, p=p, n=n, fn=fn, q=q, parent=parent, depth=1))
    return parent, parent.children


# ---------------------------------------------------------------------------------------------- 1. selection


def test_selection_score_hand_values():
    parent, (unvisited, visited) = family(((1,), 0.3, 0, 0, 0.7), ((2,), 0.2, 5, 5, 0.5))
    parent.n = 9
    # unvisited: qh = 0 whatever q says; u = c * p * sqrt(parent.n) / (1 + 0)
    assert tree.selection_score(unvisited, parent.n, c=2) == pytest.approx(2 * 0.3 * 3)
    # q = 0.5 -> qh = (0.5 + 1) / (2 + 1e-5) = 0.75 / (1 + 5e-6); u = 2 * 0.2 * 3 / 6
    assert tree.selection_score(visited, parent.n, c=2) == pytest.approx(0.75 / (1 + 5e-6) + 0.2, abs=1e-12)
    assert tree.selection_score(visited, parent.n, c=0) == pytest.approx(0.75 / (1 + 5e-6), abs=1e-12)


def test_selection_ties_go_to_the_first_inserted_child():
    parent, kids = family(((7,), 0.25, 0, 0, 0.0), ((3,), 0.25, 0, 0, 0.0), ((5,), 0.25, 0, 0, 0.0))
    parent.n = 4
    assert tree.select_child(parent, c=2) is kids[0]
    kids[2].p = 0.26
    assert tree.select_child(parent, c=2) is kids[2]


# ---------------------------------------------------------------------------------------------- 2. backup


def test_backup_hand_built_example_with_similarity_update():
    """P with A(n=2, fn=2, q=0.5), B(n=1, q=1.0) at cos(A, B) = 0.96; back up g = -1 through A."""
    a_emb = torch.tensor([1.0, 0.0])
    b_emb = torch.tensor([0.96, math.sqrt(1 - 0.96**2)])  # unit vectors at cos 0.96
    far = torch.tensor([0.94, math.sqrt(1 - 0.94**2)])  # cos 0.94: below the threshold
    parent = Node(n=4, fn=4, q=0.2)
    A = Node(tokens=(1,), n=2, fn=2, q=0.5, emb=a_emb.clone(), parent=parent)
    B = Node(tokens=(2,), n=1, fn=1, q=1.0, emb=b_emb, parent=parent)
    C = Node(tokens=(3,), n=1, fn=1, q=0.3, emb=far, parent=parent)
    D = Node(tokens=(4,), n=0, fn=0, q=0.0, emb=None, parent=parent)
    parent.children = [A, B, C, D]
    updates, cosines = tree.backup(
        [parent, A], -1.0, [None, a_emb.clone()], gamma=0.2, threshold=0.95, similarity_update=True
    )
    assert (A.n, A.fn) == (3, 3) and A.q == pytest.approx(0.0)
    w = 0.2 * 0.96
    assert B.n == pytest.approx(1 + w) and B.n == pytest.approx(1.192)
    assert B.q == pytest.approx((1 - 0.192) / 1.192)
    assert B.fn == 1  # similarity updates never count as real visits
    assert (C.n, C.q, C.fn) == (1, 0.3, 1)  # cos 0.94 < 0.95: unchanged
    assert (D.n, D.q) == (0, 0.0)  # no embedding: unchanged
    assert (parent.n, parent.fn) == (5, 5) and parent.q == pytest.approx(0.2 + (-1 - 0.2) / 5)
    assert updates == 1
    # the cosines the threshold acted on: B's and C's (D has no embedding, A is itself), in sibling order
    assert cosines == pytest.approx([0.96, 0.94])


def test_backup_running_mean_embedding_and_switch_off():
    parent = Node()
    A = Node(tokens=(1,), parent=parent)
    B = Node(tokens=(2,), n=1, fn=1, q=1.0, emb=torch.tensor([1.0, 0.0]), parent=parent)
    parent.children = [A, B]
    off = tree.backup(
        [parent, A], 1.0, [None, torch.tensor([1.0, 0.0])], gamma=0.2, threshold=0.95, similarity_update=False
    )
    assert off == (0, [])  # no update and no cosine computed
    assert torch.equal(A.emb, torch.tensor([1.0, 0.0])) and (B.n, B.q) == (1, 1.0)
    tree.backup(
        [parent, A], 1.0, [None, torch.tensor([0.0, 1.0])], gamma=0.2, threshold=0.95, similarity_update=False
    )
    assert torch.allclose(A.emb, torch.tensor([0.5, 0.5]))  # emb += (e - emb) / fn
    assert (A.n, A.fn, A.q) == (2, 2, 1.0)


# ---------------------------------------------------------------------------------------------- 4. priors


def test_token_set_schedule():
    lengths = [1, 2, 4, 10]
    assert [tree.token_set_length(d, lengths) for d in range(6)] == [1, 2, 4, 10, 10, 10]


def test_greedy_prior_clamp():
    sampled = [0.1, 0.3, 0.2]
    assert tree.clamp_greedy_prior(0.05, sampled) == pytest.approx(0.4)  # raised to max + min
    assert tree.clamp_greedy_prior(0.9, sampled) == pytest.approx(0.6)  # lowered to the sum
    assert tree.clamp_greedy_prior(0.5, sampled) == 0.5
    assert tree.clamp_greedy_prior(0.05, []) == 0.05


def test_priors_normalised_and_mixed_at_the_root_only():
    root, inner = Node(), Node(depth=1)
    raw = [0.4, 0.3, 0.1]
    tree.attach_children(root, [(1,), (2,), (3,)], raw, mix=0.25)
    tree.attach_children(inner, [(1, 2), (3, 4), (5, 6)], raw, mix=None)
    assert [ch.p for ch in inner.children] == pytest.approx([0.5, 0.375, 0.125])
    assert [ch.p for ch in root.children] == pytest.approx([0.75 * p + 0.25 / 3 for p in (0.5, 0.375, 0.125)])
    assert sum(ch.p for ch in root.children) == pytest.approx(1.0)
    assert [ch.depth for ch in inner.children] == [2, 2, 2] and inner.raw_priors == raw


def test_remix_after_commit_keeps_the_subtree():
    root, inner = Node(), Node()
    tree.attach_children(root, [(1,), (2,)], [0.5, 0.5], mix=0.25)
    child = root.children[0]
    child.n, child.q = 7, 0.4
    tree.attach_children(child, [(3, 4), (5, 6)], [0.8, 0.2], mix=None)
    grandchild = child.children[0]
    tree.remix_after_commit(child, 0.25)
    assert child.parent is None and child.children[0] is grandchild and (child.n, child.q) == (7, 0.4)
    assert [ch.p for ch in child.children] == pytest.approx([0.75 * 0.8 + 0.125, 0.75 * 0.2 + 0.125])
    tree.remix_after_commit(inner, 0.25)  # a leaf root: nothing to mix


# ---------------------------------------------------------------------------------------------- 5. dynamic addition


def alike_and_bad() -> Node:
    parent, kids = family(((1,), 0.5, 1, 1, -1.0), ((2,), 0.3, 1, 1, -0.5), ((3,), 0.2, 1, 1, -0.2))
    for i, ch in enumerate(kids):
        ch.emb = torch.tensor([1.0, 0.001 * i])
    parent.ranked = [(1, 0.4), (2, 0.3), (3, 0.1), (9, 0.1), (8, 0.05)]
    return parent


def test_dynamic_addition_needs_all_four_conditions():
    assert tree.wants_addition(alike_and_bad(), max_children=20, var_coef=0.03)
    node = alike_and_bad()
    assert not tree.wants_addition(node, max_children=3, var_coef=0.03)  # 3 children: not < 3
    node = alike_and_bad()
    node.children[1].emb = None
    assert not tree.wants_addition(node, max_children=20, var_coef=0.03)  # a child without embedding
    node = alike_and_bad()
    node.children[2].emb = torch.tensor([0.0, 1.0])
    assert not tree.wants_addition(node, max_children=20, var_coef=0.03)  # children differ
    node = alike_and_bad()
    node.children[2].q = 0.0
    assert not tree.wants_addition(node, max_children=20, var_coef=0.03)  # not every child bad
    node = alike_and_bad()
    node.children = node.children[:1]
    assert not tree.wants_addition(node, max_children=20, var_coef=0.03)  # one child: variance undefined


def test_dynamic_addition_adds_exactly_one_child():
    node = alike_and_bad()
    tok, p = tree.next_ranked_token(node)
    assert tok == 9 and p == pytest.approx(0.1 / 0.9)  # the 4th most probable, renormalised over the top 4
    child = tree.add_child(node, (tok,), p, is_root=False, mix=0.25)
    assert len(node.children) == 4 and node.children[-1] is child and child.p == pytest.approx(0.1 / 0.9)
    assert tree.add_child(node, (tok,), p, is_root=False, mix=0.25) is None and len(node.children) == 4
    root = alike_and_bad()
    child = tree.add_child(root, (9,), 0.1 / 0.9, is_root=True, mix=0.25)
    assert child.p == pytest.approx(0.75 * 0.1 / 0.9 + 0.25 / 4)  # root: mixed with K = nc + 1


# ---------------------------------------------------------------------------------------------- 6. stop, commit


def test_early_stop_iff_best_child_visited_enough_and_good():
    root, (a, b) = family(((1,), 0.5, 7, 7, 0.9), ((2,), 0.5, 3, 3, 1.0))
    assert tree.should_stop(root, T_m=6, V=0.8)
    a.fn = 6
    assert not tree.should_stop(root, T_m=6, V=0.8)  # fn must exceed T_m
    a.fn, a.q = 7, 0.8
    assert not tree.should_stop(root, T_m=6, V=0.8)  # q must exceed V
    assert not tree.should_stop(Node(), T_m=6, V=0.8)


def test_commit_is_argmax_n_ties_by_q_then_order():
    root, (a, b, c) = family(((1,), 0.5, 3, 3, 0.1), ((2,), 0.3, 4, 2, -0.5), ((3,), 0.2, 4, 4, 0.2))
    assert tree.best_child(root) is c  # n = 4 twice (b's is partly similarity updates): larger q wins
    c.q = -0.5
    assert tree.best_child(root) is b  # full tie: the first inserted
    assert tree.sample_by_visits(root, 0.0) is a and tree.sample_by_visits(root, 0.99) is c


def test_iteration_budget():
    assert tree.search_range(0, 50) == range(0, 50)
    assert tree.search_range(40, 50) == range(40, 55)  # at least 15 more when the subtree is well visited
    assert len(tree.search_range(10, 50)) == 40
