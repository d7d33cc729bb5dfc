"""Critic-free group advantages (GRPO, RLOO) against hand values."""

from __future__ import annotations

import pytest
import torch

from alignlab.rl.advantages import group_advantages


def test_grpo_hand_values():
    # group 1: returns 1, 2, 3, 6 -> mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14 / 3)
    # group 2: all equal -> no signal
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4, "grpo", eps=0.0 + 1e-12)
    std = (14 / 3) ** 0.5
    assert torch.allclose(a[:4], torch.tensor([-2 / std, -1 / std, 0.0, 3 / std]), atol=1e-6)
    assert torch.equal(a[4:], torch.zeros(4))


def test_grpo_eps_keeps_a_near_constant_group_finite():
    a = group_advantages(torch.tensor([1.0, 1.0 + 1e-7]), 2, "grpo")
    assert torch.isfinite(a).all() and a.abs().max() < 1e-2


def test_rloo_is_the_leave_one_out_baseline():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 0.0])
    a = group_advantages(r, 3, "rloo")
    # sample i minus the mean of its K - 1 siblings, by hand
    hand = [1 - 2.5, 2 - 2.0, 3 - 1.5, 6 - 2.0, 4 - 3.0, 0 - 5.0]
    assert torch.allclose(a, torch.tensor(hand), atol=1e-6)
    # every group's advantages sum to 0: the baseline removes the prompt's own difficulty
    assert torch.allclose(a.view(-1, 3).sum(1), torch.zeros(2), atol=1e-6)


@pytest.mark.parametrize(
    ("returns", "k", "kind", "match"),
    [
        (torch.zeros(4), 1, "grpo", "K >= 2"),
        (torch.zeros(5), 2, "rloo", "whole groups"),
        (torch.zeros(4), 2, "gae", "choose one of"),
    ],
)
def test_bad_arguments(returns, k, kind, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(returns, k, kind)
