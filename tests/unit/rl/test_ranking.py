"""Reward-model losses: Llama 2 margins, InstructGPT K-way ranking (spec invariants 3 and 4)."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from alignlab.recipes.rm import KWayCollator
from alignlab.rl.ranking import MARGINS, kway_loss, margin_for, pairwise_loss, ranked_pairs


def test_margin_tables():
    assert [margin_for(r, "small") for r in MARGINS["small"]] == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert [margin_for(r, "large") for r in MARGINS["large"]] == [3, 2, 1, 0]
    assert margin_for("better", "none") == 0 and margin_for("unsure", "large") == 0
    with pytest.raises(ValueError, match="^table='huge'; choose one of none, small, large"):
        margin_for("better", "huge")
    with pytest.raises(ValueError, match="rating"):
        margin_for("much better", "small")


def test_margin_loss_identities():
    r_c, r_r, m = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 0.5, 1.0]), torch.tensor([1.0, 0.0, 0.3])
    # r_c - r_r == m -> log 2 per pair
    assert pairwise_loss(r_c[:2], r_r[:2], m[:2]).item() == pytest.approx(math.log(2))
    assert torch.allclose(pairwise_loss(r_c, r_r, m), F.softplus(r_r - r_c + m).mean())
    assert pairwise_loss(r_c, r_r) < pairwise_loss(r_c, r_r, m)  # a margin asks for more separation
    centred = pairwise_loss(r_c, r_r, m, center_coef=0.01)
    assert centred.item() == pytest.approx(
        (F.softplus(r_r - r_c + m).mean() + 0.01 * ((r_c + r_r) ** 2).mean()).item()
    )


@pytest.mark.parametrize("k", range(2, 10))
def test_kway_pairs_and_weights(k):
    ranks = list(range(k))
    assert len(ranked_pairs(ranks)) == math.comb(k, 2)
    scores = torch.randn(k, generator=torch.Generator().manual_seed(k))
    expected = sum(F.softplus(scores[j] - scores[i]) for i, j in combinations(range(k), 2)) / math.comb(k, 2)
    loss = kway_loss(scores, torch.zeros(k, dtype=torch.long), torch.tensor(ranks))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_kway_ties_and_sets():
    assert ranked_pairs([0, 1, 1, 2]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]  # the tie makes no pair
    assert ranked_pairs([1, 0]) == [(1, 0)]
    # Two sets of different K: the loss is the mean over sets of each set's mean over its pairs.
    s1, s2 = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.2, 0.7])
    loss = kway_loss(torch.cat([s1, s2]), torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 0, 1]))
    one = kway_loss(s1, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]))
    two = pairwise_loss(s2[:1], s2[1:])  # K = 2 is the pairwise loss
    assert loss.item() == pytest.approx(((one + two) / 2).item())
    with pytest.raises(ValueError, match="untied"):
        kway_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_kway_collator_forwards_each_answer_once():
    examples = [
        {"sequences": [[5, 6, 2], [7, 2], [8, 9, 9, 2]], "ranks": [0, 1, 2]},
        {"sequences": [[5, 2], [6, 2]], "ranks": [0, 1]},
    ]
    batch = KWayCollator(pad_id=0)(examples)
    assert batch["input_ids"].shape == (5, 4)  # K1 + K2 rows: every answer forwarded once
    assert batch["labels"].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 4, 2, 2]


def test_kway_gradient_weights():
    """Each pair of a K-set carries weight 1/C(K,2): d loss / d s_best = -sum_j sigmoid(s_j - s_best) / C(K,2)."""
    k = 4
    scores = torch.zeros(k, requires_grad=True)
    kway_loss(scores, torch.zeros(k, dtype=torch.long), torch.arange(k)).backward()
    assert scores.grad[0].item() == pytest.approx(-(k - 1) * 0.5 / math.comb(k, 2))
    assert scores.grad.sum().item() == pytest.approx(0.0, abs=1e-7)
