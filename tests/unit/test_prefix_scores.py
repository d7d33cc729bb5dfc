"""scoring.PrefixScores (ARGS's cached reward model) against scoring every candidate sequence whole."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForSequenceClassification

from alignlab.scoring import PrefixScores, RewardScorer
from tests.unit.conftest import tiny_config, word_tokenizer


@pytest.fixture(params=[False, True], ids=["pad", "pad_is_eos"])
def scorers(tmp_path, request):
    tok = word_tokenizer(pad_is_eos=request.param)
    paths = {}
    for seed, role in enumerate(("helpful", "safety")):
        torch.manual_seed(seed)  # initializer_range 0.3: positions and attention move the score
        LlamaForSequenceClassification(tiny_config(tok, num_labels=1, initializer_range=0.3)).save_pretrained(
            tmp_path / role
        )
        tok.save_pretrained(tmp_path / role)
        paths[role] = str(tmp_path / role)
    single = RewardScorer(kind="single", reward_model=paths["helpful"], normalize=False)
    pair = RewardScorer(
        kind="llama2", helpful_model=paths["helpful"], safety_model=paths["safety"], whiten=False
    )
    return tok, single, pair


@pytest.mark.parametrize("kind", ["single", "llama2"])
def test_cached_candidates_score_as_the_whole_sequences(scorers, kind):
    tok, single, pair = scorers
    scorer = single if kind == "single" else pair
    eos = tok.eos_token_id
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12]]  # different lengths: left padding in the cache
    safety = [False, True, True]
    cached = PrefixScores(scorer, eos, safety if kind == "llama2" else None)
    cached.begin(prompts)
    answers: list[list[int]] = [[], [], []]
    for step, rows in enumerate([[0, 1, 2], [0, 1, 2], [0, 2], [2]]):
        cands = torch.tensor([[4, 5, eos]] * len(rows))  # the EOS as a candidate: read at that EOS, once
        got = cached.candidates(rows, cands)
        seqs = [
            prompts[r] + answers[r] + [c] + ([] if c == eos else [eos]) for r in rows for c in (4, 5, eos)
        ]
        flags = [safety[r] for r in rows for _ in range(3)] if kind == "llama2" else None
        want = scorer.score_ids(seqs, flags).view(len(rows), 3)
        assert torch.allclose(got, want, atol=1e-5), (step, got, want)
        chosen = torch.tensor([6 + step + r for r in rows])
        for r, t in zip(rows, chosen.tolist(), strict=True):
            answers[r].append(t)
        cached.advance(rows, chosen)
    # one encoding of the prompts, 2 tokens per candidate, 1 per appended token (each reward model computes them)
    calls = [3, 3, 2, 1]
    assert cached.tokens == 3 * 5 + sum(2 * 3 * n + n for n in calls)
