"""Reward scoring at the last non-pad token, padding invariance, normalisation, Llama 2's two-RM rule (inv. 2, 15)."""

from __future__ import annotations

import pytest
import torch

from alignlab.rl.rewards import Normalization, llama2_reward, llama2_select, logit, whiten
from alignlab.scoring import load_normalization, save_normalization, score_sequences
from alignlab.tensors import pad_sequences, position_ids

SEQS = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 10, 11, 12, 13, 2]]


def test_score_is_read_at_the_last_non_pad_token(tiny_rm, tokenizer):
    ids, mask = pad_sequences(SEQS, tokenizer.pad_token_id)
    scores = score_sequences(tiny_rm, ids, mask)
    hidden = tiny_rm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    per_token = tiny_rm.score(hidden).squeeze(-1)
    last = torch.tensor([len(s) - 1 for s in SEQS])
    assert torch.allclose(scores, per_token[torch.arange(3), last], atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_score_unchanged_by_extra_padding(tiny_rm, tokenizer, side):
    alone = torch.cat([score_sequences(tiny_rm, *pad_sequences([s], tokenizer.pad_token_id)) for s in SEQS])
    ids, mask = pad_sequences(SEQS, tokenizer.pad_token_id, side=side)
    extra = 5
    pad = torch.full((3, extra), tokenizer.pad_token_id)
    zeros = torch.zeros((3, extra), dtype=torch.long)
    ids, mask = (
        (torch.cat([ids, pad], 1), torch.cat([mask, zeros], 1))
        if side == "right"
        else (torch.cat([pad, ids], 1), torch.cat([zeros, mask], 1))
    )
    assert torch.allclose(score_sequences(tiny_rm, ids, mask), alone, atol=1e-5)


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_llama2_combination_truth_table():
    z_h, z_s = (
        torch.tensor([2.0, 2.0, 2.0, 2.0]),
        torch.tensor([1.0, -3.0, 1.0, -3.0]),
    )  # sigmoid(-3) = 0.047 < 0.15
    is_safety = torch.tensor([True, True, False, False])
    chosen = llama2_select(z_h, z_s, is_safety)
    # safety-tagged -> safety score; untagged -> helpfulness unless the safety score is below the threshold
    assert torch.allclose(chosen, torch.sigmoid(torch.tensor([1.0, -3.0, 2.0, -3.0])))
    # the threshold is strict and on the sigmoid: exactly 0.15 keeps the helpfulness score
    at = logit(torch.tensor([0.15]))
    assert llama2_select(torch.tensor([2.0]), at, torch.tensor([False])) == torch.sigmoid(torch.tensor(2.0))
    raw = llama2_reward(z_h, z_s, is_safety, whiten_batch=False)
    assert torch.allclose(raw, torch.tensor([1.0, -3.0, 2.0, -3.0]), atol=1e-5)  # logit(sigmoid(z)) == z
    white = llama2_reward(z_h, z_s, is_safety)
    assert white.mean().abs() < 1e-6 and white.std().item() == pytest.approx(1.0, abs=1e-5)


def test_logit_inverts_sigmoid_and_stays_finite():
    z = torch.linspace(-8, 8, 33)
    assert torch.allclose(logit(torch.sigmoid(z)), z, atol=1e-3)
    assert torch.isfinite(logit(torch.tensor([0.0, 1.0]))).all()


def test_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    w = whiten(x)
    assert w.mean().abs() < 1e-6 and w.std().item() == pytest.approx(1.0, abs=1e-6)
    assert whiten(torch.tensor([4.0])).tolist() == [0.0]


def test_normalization_fit_apply_and_store(tmp_path):
    raw = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 3 + 7
    norm = Normalization.fit(raw)
    out = norm(raw)
    assert out.mean().abs() < 1e-5 and out.std().item() == pytest.approx(1.0, abs=1e-5)
    save_normalization(norm, tmp_path)
    assert load_normalization(tmp_path) == norm
    assert load_normalization(tmp_path / "nothing-here") == Normalization()  # no file: identity
    with pytest.raises(ValueError, match="at least 2"):
        Normalization.fit(torch.tensor([1.0]))
