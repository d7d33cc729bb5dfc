"""The rollout sampler's fast path (alignlab.generation.generate_tokens): preallocated KV cache, compaction of
finished rows, inverse-CDF sampling. Each is checked against the slow path it replaces."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

from alignlab.generation import _rollout_cache, generate_tokens, sample_token
from alignlab.tensors import pad_sequences
from tests.unit.conftest import tiny_config
from tests.unit.rl.test_ppo_model_invariants import PROMPTS, eos_biased


def queries(tokenizer, copies: int = 4):
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS] * copies
    return pad_sequences(ids, tokenizer.pad_token_id, side="left")


def answers(response: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(response, mask, strict=True)]


def test_exact_mode_draws_the_tokens_hf_generate_draws(tiny_lm, tokenizer):
    """sampler=multinomial, compact=False: token for token what model.generate samples from the same seed, so the
    preallocated cache computes the same logits as HF's own cache."""
    lm = eos_biased(tiny_lm, tokenizer.eos_token_id, bias=1.0)
    q, m = queries(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(3)
    gen = lm.generate(
        input_ids=q, attention_mask=m, do_sample=True, top_k=0, top_p=1.0, temperature=0.8,
        max_new_tokens=12, pad_token_id=pad, eos_token_id=eos,
    )[:, q.shape[1] :]  # fmt: skip
    torch.manual_seed(3)
    response, mask, ended = generate_tokens(
        lm,
        q,
        m,
        max_new_tokens=12,
        temperature=0.8,
        eos_id=eos,
        pad_id=pad,
        sampler="multinomial",
        compact=False,
    )
    ours = answers(response, mask)
    assert ended.any() and (~ended).any()
    assert ours == [row[: len(a)].tolist() for row, a in zip(gen, ours, strict=True)]


def test_compaction_changes_no_row(tiny_lm, tokenizer):
    """Dropping finished rows from the batch (and the cache) gives every row the tokens it gets without it."""
    lm = eos_biased(tiny_lm, tokenizer.eos_token_id, bias=1.5)
    q, m = queries(tokenizer)
    kw = dict(
        max_new_tokens=16, temperature=1.0, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id
    )
    torch.manual_seed(5)
    full = generate_tokens(lm, q, m, compact=False, **kw)
    torch.manual_seed(5)
    compacted = generate_tokens(lm, q, m, compact=True, **kw)
    lengths = full[1].sum(1)
    assert lengths.min() * 2 < lengths.max(), "some rows should end well before others (compaction happens)"
    for a, b in zip(full, compacted, strict=True):
        assert torch.equal(a, b)


def test_inverse_cdf_sampler_matches_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, float("-inf"), -1.0, 1.0, float("-inf")]])
    temperature = 0.7
    probs = torch.softmax(logits / temperature, -1)[0]
    n = 200_000
    draws = sample_token(logits.expand(n, -1), temperature)
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[2] == 0 and counts[5] == 0  # zero-probability tokens are never drawn
    expected = probs.double() * n
    live = expected > 0
    chi2 = (((counts - expected) ** 2)[live] / expected[live]).sum()
    assert chi2 < 20.0, f"chi2={chi2:.1f} over 3 degrees of freedom"  # p ~ 2e-4 for a correct sampler
    # the edges of the uniform: 0 picks the first live token, just under 1 the last live one
    edge = sample_token(logits.expand(2, -1), temperature, uniform=torch.tensor([[0.0], [1.0 - 1e-7]]))
    assert edge.tolist() == [0, 4]
    with pytest.raises(ValueError, match="sampler"):
        sample_token(logits, 1.0, sampler="top_k")


def test_other_attention_layouts_keep_hfs_cache(tokenizer):
    """Sliding-window layers get HF's own cache (no preallocated buffer); full attention gets the buffer."""
    llama = LlamaForCausalLM(tiny_config(tokenizer))
    assert _rollout_cache(llama, 10) is not None
    cfg = tiny_config(tokenizer).to_dict()
    cfg.pop("model_type", None)
    mistral = MistralForCausalLM(MistralConfig(**{**cfg, "sliding_window": 4}))
    assert _rollout_cache(mistral, 10) is None
    q, m = queries(tokenizer, copies=1)
    torch.manual_seed(0)
    response, mask, _ = generate_tokens(
        mistral, q, m, max_new_tokens=6, temperature=1.0, eos_id=tokenizer.eos_token_id, pad_id=0
    )
    assert response.shape[0] == len(PROMPTS) and mask.shape == response.shape


def test_sampling_pass_logprobs_equal_a_full_forwards(tiny_lm, tokenizer):
    """return_logprobs (stage.old_logprobs=sampling): each sampled token's log-prob from the sampling pass equals
    the full forward's (what forward_stats computes otherwise) up to cached-attention rounding, compaction on; the
    tokens drawn are those drawn without it; padding gets 0."""
    from alignlab.experience import forward_stats
    from alignlab.rollout import Prompts, Rollout

    lm = eos_biased(tiny_lm, tokenizer.eos_token_id, bias=1.5)
    q, m = queries(tokenizer)
    kw = dict(
        max_new_tokens=14, temperature=0.7, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id
    )
    torch.manual_seed(11)
    plain = generate_tokens(lm, q, m, **kw)
    torch.manual_seed(11)
    response, mask, ended, logps = generate_tokens(lm, q, m, return_logprobs=True, **kw)
    assert torch.equal(response, plain[0]) and torch.equal(mask, plain[1]) and torch.equal(ended, plain[2])
    assert ended.any() and (~ended).any()  # rows were compacted away mid-rollout
    assert torch.all(logps[mask == 0] == 0) and torch.all(logps[mask == 1] < 0)
    prompts = Prompts(list(PROMPTS) * 4, [], [False] * len(q), 0)
    ro = Rollout(prompts, q, m, response, mask, ended, [""] * len(q))
    full, _, _ = forward_stats(lm, lm, None, ro, 5, 0.7, lora=False)
    torch.testing.assert_close(logps, full * mask, atol=1e-5, rtol=1e-5)
    # forward_stats takes the rollout's own log-probs instead of a forward
    ro.logprobs = logps
    kept, _, _ = forward_stats(lm, lm, None, ro, 5, 0.7, lora=False)
    assert torch.equal(kept, logps)
