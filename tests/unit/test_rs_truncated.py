"""Answers that ran out of budget (no EOS within max_new_tokens) are not fine-tuned on by default: rejection
sampling drops them before selection (a prompt whose every answer is truncated keeps nothing), context distillation
never keeps a truncated preprompted answer; truncated=keep keeps them, counted."""

from __future__ import annotations

import pytest

from alignlab.recipes.context_distillation import distillation_stats, training_rows
from alignlab.rl.selection import keep_best, keep_complete


def cand(response, score, ended=True, iteration=1):
    return {"response": response, "score": score, "iteration": iteration, "ended": ended}


CANDIDATES = {
    # the best-scoring answer ran out of budget: drop keeps the best complete one
    "p1": [cand("cut off", 5.0, ended=False), cand("complete", 1.0), cand("worse", 0.5)],
    # every answer truncated: nothing kept
    "p2": [cand("cut a", 2.0, ended=False), cand("cut b", 3.0, ended=False)],
    # nothing truncated: plain argmax
    "p3": [cand("x", 0.1), cand("y", 0.2)],
}


def test_drop_selects_among_complete_answers_only():
    sel = keep_complete(CANDIDATES, "drop")
    assert {p: c["response"] for p, c in sel.kept.items()} == {"p1": "complete", "p3": "y"}
    assert sel.truncated_dropped == 3 and sel.all_truncated == ["p2"] and sel.truncated_kept == 0


def test_keep_is_keep_best_with_the_truncated_kept_counted():
    sel = keep_complete(CANDIDATES, "keep")
    assert sel.kept == keep_best(CANDIDATES)
    assert {p: c["response"] for p, c in sel.kept.items()} == {"p1": "cut off", "p2": "cut b", "p3": "y"}
    assert sel.truncated_kept == 2 and sel.truncated_dropped == 0 and sel.all_truncated == []


def test_candidates_without_the_flag_count_as_complete_and_bad_options_fail():
    old = {"p": [{"response": "a", "score": 1.0}, {"response": "b", "score": 2.0}]}  # pools of older runs
    assert keep_complete(old, "drop").kept["p"]["response"] == "b"
    with pytest.raises(ValueError, match="truncated='sometimes'"):
        keep_complete(old, "sometimes")
    with pytest.raises(ValueError, match="no candidate samples"):
        keep_complete({"p": []}, "drop")


def test_keep_all_iterations_a_later_complete_answer_replaces_nothing_truncated():
    # iteration 1's only answer to p was truncated (nothing kept); iteration 2 draws a complete one: kept
    pool = {"p": [cand("cut", 9.0, ended=False, iteration=1), cand("done", -1.0, iteration=2)]}
    sel = keep_complete(pool, "drop")
    assert sel.kept["p"]["response"] == "done" and sel.kept["p"]["iteration"] == 2


def cd(response, kept, ended, gate_passed=None):
    return {
        "prompt": "P",
        "preprompt": "Be safe.",
        "response": response,
        "baseline_response": "b",
        "score": 1.0,
        "baseline_score": 0.0,
        "ended": ended,
        "gate_passed": kept if gate_passed is None else gate_passed,
        "kept": kept,
    }


def test_context_distillation_counts_truncated_answers_it_did_not_distill():
    # the recipe sets kept = gate passed and ended under truncated=drop
    candidates = [
        cd("complete", kept=True, ended=True),
        cd("cut off", kept=False, ended=False, gate_passed=True),  # passed the gate, dropped as truncated
        cd("cut, rejected", kept=False, ended=False, gate_passed=False),  # the gate rejected it anyway
        cd("rejected", kept=False, ended=True),
    ]
    stats = distillation_stats(candidates, gated=True, truncated="drop")
    assert stats["cd/kept"] == 1 and stats["cd/rejected"] == 3
    assert stats["cd/truncated_dropped"] == 1 and stats["cd/truncated_kept"] == 0
    assert [r["completion"] for r in training_rows(candidates)] == ["complete"]
    kept_anyway = [cd("cut off", kept=True, ended=False), cd("complete", kept=True, ended=True)]
    stats = distillation_stats(kept_anyway, gated=True, truncated="keep")
    assert stats["cd/truncated_kept"] == 1 and stats["cd/truncated_dropped"] == 0
