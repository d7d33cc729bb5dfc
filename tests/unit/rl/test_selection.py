"""Invariant 16 (the project's RLHF spec): rejection sampling keeps the argmax per prompt; best-of-N statistics; the context
distillation gate keeps exactly the improved samples; no preprompt reaches a CD training input."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf

from alignlab.config import ContextDistillationConfig
from alignlab.recipes.context_distillation import (
    check_no_preprompt,
    preprompt_for,
    training_rows,
    with_preprompt,
)
from alignlab.recipes.rejection_sampling import training_rows as rs_rows
from alignlab.rl.selection import best_of_n, distillation_gate, keep_best


def test_best_of_n_on_a_hand_made_pool():
    # Three prompts, four samples each, in the order they were drawn.
    scores = torch.tensor(
        [
            [1.0, 3.0, 2.0, 0.0],  # running max 1, 3, 3, 3
            [0.0, 0.0, 5.0, 1.0],  # running max 0, 0, 5, 5
            [2.0, 1.0, 1.0, 4.0],  # running max 2, 2, 2, 4
        ]
    )
    c = best_of_n(scores)
    assert c.n == [1, 2, 3, 4]
    assert c.mean == pytest.approx([1.0, 5 / 3, 10 / 3, 4.0])
    assert c.median == pytest.approx([1.0, 2.0, 3.0, 4.0])


def test_best_of_n_median_of_an_even_count_is_the_middle_mean():
    c = best_of_n(torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
    assert c.median == pytest.approx([2.0, 2.5])  # N=1: (1+3)/2; N=2: (1+4)/2
    assert c.mean == pytest.approx([2.0, 2.5])


def test_best_of_n_is_non_decreasing_from_the_first_sample_to_the_pool_max():
    scores = torch.randn(40, 9, generator=torch.Generator().manual_seed(1))
    c = best_of_n(scores)
    assert c.mean[0] == pytest.approx(scores[:, 0].mean().item(), abs=1e-6)
    assert all(b >= a for a, b in zip(c.mean, c.mean[1:], strict=False))
    assert all(b >= a for a, b in zip(c.median, c.median[1:], strict=False))
    assert c.mean[-1] == pytest.approx(scores.max(1).values.mean().item(), abs=1e-6)


def test_keep_best_takes_the_best_over_all_iterations():
    candidates = {
        "p1": [
            {"response": "old good", "score": 2.0, "iteration": 1},
            {"response": "new worse", "score": 1.0, "iteration": 2},
        ],
        "p2": [
            {"response": "old", "score": 0.0, "iteration": 1},
            {"response": "new better", "score": 0.5, "iteration": 2},
        ],
        "p3": [{"response": "tie first", "score": 1.0, "iteration": 1}, {"response": "tie", "score": 1.0}],
    }
    kept = keep_best(candidates)
    assert kept["p1"]["response"] == "old good" and kept["p1"]["iteration"] == 1
    assert kept["p2"]["response"] == "new better"
    assert kept["p3"]["response"] == "tie first"


def test_rejection_sampling_rows_are_sft_rows_of_the_kept_answers():
    kept = keep_best(
        {
            "P": [
                {"response": " a", "score": 0.1, "iteration": 1, "is_safety": True},
                {"response": " b", "score": 0.7, "iteration": 1, "is_safety": True},
            ]
        }
    )
    assert rs_rows(kept) == [
        {"prompt": "P", "completion": " b", "score": 0.7, "iteration": 1, "is_safety": True}
    ]


def test_gate_keeps_exactly_the_improved_samples():
    distilled = torch.tensor([1.0, 0.5, -1.0, 2.0, 0.3])
    baseline = torch.tensor([0.0, 0.5, -2.0, 3.0, 0.2])
    assert distillation_gate(distilled, baseline).tolist() == [True, False, True, False, True]
    # a margin: the gain must exceed it
    assert distillation_gate(distilled, baseline, margin=0.5).tolist() == [True, False, True, False, False]
    with pytest.raises(ValueError, match="shapes differ"):
        distillation_gate(distilled, baseline[:2])


def cd_stage(**kw):
    return OmegaConf.merge(OmegaConf.structured(ContextDistillationConfig), kw)


def test_preprompt_text_never_reaches_a_training_input():
    s = cd_stage()
    rng = random.Random(0)
    prompts = [
        "\n\nHuman: how do i rob a bank?\n\nAssistant:",
        "\n\nHuman: help me pick a lock.\n\nAssistant:",
    ]
    candidates = []
    for p in prompts:
        pre = preprompt_for({"prompt": p}, s, rng)
        shown = with_preprompt(p, pre, s.prompt_template)
        assert shown.startswith(pre) and shown.endswith(p)  # the teacher sees the preprompt
        candidates.append(
            {
                "prompt": p,
                "preprompt": pre,
                "response": " I won't.",
                "baseline_response": " Sure.",
                "score": 1.0,
                "baseline_score": 0.0,
                "kept": True,
            }
        )
    rows = training_rows(candidates)
    assert [r["prompt"] for r in rows] == prompts
    check_no_preprompt(rows, [c["preprompt"] for c in candidates])
    for r in rows:
        assert not any(pre in r["prompt"] + r["completion"] for pre in s.preprompts)


def test_check_no_preprompt_catches_a_leak():
    pre = "You are a safe and responsible assistant."
    with pytest.raises(AssertionError, match="row 1"):
        check_no_preprompt([{"prompt": "x"}, {"prompt": pre + "\n\nHuman: hi"}], [pre])


def test_training_rows_keep_only_gated_candidates():
    base = {"prompt": "p", "preprompt": "pre", "baseline_response": "b", "baseline_score": 0.0}
    candidates = [
        {**base, "response": "kept", "score": 1.0, "kept": True},
        {**base, "response": "dropped", "score": -1.0, "kept": False},
    ]
    assert [r["completion"] for r in training_rows(candidates)] == ["kept"]


def test_answer_templates_follow_the_row_category():
    s = cd_stage(
        preprompts=["Be safe."],
        answer_templates={"crime": "Refuse anything in the {category} category."},
    )
    rng = random.Random(0)
    assert preprompt_for({"category": "crime"}, s, rng) == "Be safe. Refuse anything in the crime category."
    assert preprompt_for({"category": "other"}, s, rng) == "Be safe."
    assert preprompt_for({}, s, rng) == "Be safe."


def test_prompt_template_needs_both_fields():
    assert with_preprompt("Q", "P", "[{preprompt}] {prompt}") == "[P] Q"
    with pytest.raises(ValueError, match="prompt_template"):
        with_preprompt("Q", "P", "{prompt}")
