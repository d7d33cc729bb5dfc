"""PPO invariants with a real (tiny, random) causal LM: step-0 KL, EOS truncation, padding invariance, token
values, PPO-ptx gradients, dropout (spec invariants 5, 11, 12 and 14)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import LlamaForCausalLM

from alignlab.data.text_blocks import LMBatch
from alignlab.experience import Experience, actor_loss, forward_stats, trim
from alignlab.generation import generate_tokens, response_logits, token_logprobs, truncate_after_eos
from alignlab.models import TokenValueModel, disable_dropout, token_values
from alignlab.rl.advantages import masked_mean
from alignlab.rl.kl import kl_per_token, shape_scores
from alignlab.rl.losses import lm_loss, policy_loss
from alignlab.rollout import sample_rollout, tokenize_prompts
from alignlab.tensors import pad_sequences
from tests.unit.conftest import tiny_config

PROMPTS = [
    "Human : how like this ? Assistant :",
    "Human : hi Assistant :",
    "Human : a b c d ? Assistant : sure . Human : no ? Assistant :",
    "Human : hello Assistant :",
    "Human : yes this . Assistant :",
    "Human : how ? Assistant :",
]
MAX_NEW = 8


def eos_biased(lm: LlamaForCausalLM, eos_id: int, bias: float = 2.0) -> LlamaForCausalLM:
    """The same model with a bias on the EOS logit, so that some sampled answers end and some run out of budget."""
    old = lm.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_id] = bias
    lm.lm_head = head
    return lm


def rollout(lm, tokenizer, temperature: float = 1.0, seed: int = 0, max_new_tokens: int = MAX_NEW):
    prompts = tokenize_prompts(tokenizer, [{"prompt": p} for p in PROMPTS], max_length=64)
    assert prompts.dropped == 0 and len(prompts) == len(PROMPTS)
    torch.manual_seed(seed)
    return sample_rollout(
        lm, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, device="cpu"
    )


def micro_batch(ro, rows, old_logprobs, advantages):
    """A training micro-batch exactly as recipes.ppo builds it: Experience.micro_batch (trimmed query padding and
    response length). Values, returns, scores and KL are not read by the actor loss: zeros."""
    mask = ro.response_mask.float()
    zeros, no_scores = torch.zeros_like(mask), torch.zeros(len(ro.texts))
    exp = Experience(
        rollout=ro,
        raw_scores=no_scores,
        scores=no_scores,
        response_mask=mask,
        old_logprobs=old_logprobs,
        old_values=zeros,
        kl=zeros,
        non_score=zeros,
        advantages=advantages,
        returns=zeros,
        seconds={},
    )
    return exp.micro_batch(torch.as_tensor(rows))


def grads(model) -> list[torch.Tensor]:
    return [
        p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
    ]


# ------------------------------------------------------------------ invariant 5: step 0, policy == reference


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_step_zero_kl_exactly_zero_and_ratio_one(tiny_lm, tiny_rm, tokenizer, temperature):
    policy = eos_biased(tiny_lm, tokenizer.eos_token_id)
    disable_dropout(policy)
    reference = copy.deepcopy(policy)
    ro = rollout(policy, tokenizer, temperature)
    B = len(ro.texts)
    critic = TokenValueModel(tiny_rm)

    old, ref, values = forward_stats(policy, reference, critic, ro, B, temperature, lora=False)
    assert old.shape == ref.shape == values.shape == ro.response.shape
    assert torch.isfinite(old).all() and (old <= 0).all()
    mask = ro.response_mask.float()
    for estimator in ("k1", "k3"):
        kl = kl_per_token(old, ref, mask, estimator)
        assert torch.equal(kl, torch.zeros_like(kl)), estimator
    assert torch.equal(old, ref)

    # the training forward on the same micro-batch: rho == 1 exactly, nothing clipped
    torch.manual_seed(1)
    advantages = torch.randn(ro.response.shape) * mask
    mb = micro_batch(ro, list(range(B)), old, advantages)
    logprobs = token_logprobs(response_logits(policy, mb.ids, mb.mask, mb.ctx), mb.response, temperature)
    ratio = torch.exp(logprobs - mb.old_logprobs)
    assert torch.equal(ratio, torch.ones_like(ratio))
    loss, stats = actor_loss(policy, mb, temperature, 0.2, 0.0, None)
    assert stats["ppo/clipfrac"] == 0.0
    assert stats["ppo/approxkl"] == 0.0
    assert loss.item() == pytest.approx(-masked_mean(advantages, mask).item(), abs=1e-7)


def test_step_zero_ratio_one_across_reshuffled_micro_batches(tiny_lm, tiny_rm, tokenizer):
    """The recipe's training micro-batches are shuffled and trimmed differently from forward_stats' chunks; the
    matmul shapes then differ, so rho is 1 to float rounding (not bit-exact), and nothing is clipped."""
    policy = eos_biased(tiny_lm, tokenizer.eos_token_id)
    reference = copy.deepcopy(policy)
    ro = rollout(policy, tokenizer, 0.7, seed=3)
    old, ref, _ = forward_stats(policy, reference, TokenValueModel(tiny_rm), ro, 4, 0.7, lora=False)
    assert torch.equal(old, ref)
    advantages = torch.randn(ro.response.shape)
    for rows in ([5, 0], [3, 1, 4], [2]):
        mb = micro_batch(ro, rows, old, advantages)
        _, stats = actor_loss(policy, mb, 0.7, 0.2, 0.0, None)
        assert stats["ppo/clipfrac"] == 0.0
        assert stats["ppo/approxkl"] < 1e-12


# ------------------------------------------------------------------ invariant 12: truncation after the first EOS


def test_truncate_after_eos():
    eos, pad = 2, 3
    response = torch.tensor(
        [
            [5, 2, 7, 2, 9],  # EOS in the middle, a second one after it
            [5, 6, 7, 8, 9],  # no EOS: all tokens kept
            [2, 5, 6, 7, 8],  # EOS first: length 1
            [5, 6, 7, 8, 2],  # EOS in the last column
        ]
    )
    out, mask = truncate_after_eos(response, eos, pad)
    assert out.tolist() == [[5, 2, 3, 3, 3], [5, 6, 7, 8, 9], [2, 3, 3, 3, 3], [5, 6, 7, 8, 2]]
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    # pad == eos (a common setup): the mask is still by position, and covers the EOS
    out, mask = truncate_after_eos(response, eos, eos)
    assert out.tolist() == [[5, 2, 2, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2], [5, 6, 7, 8, 2]]
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_sample_rollout_truncation_ended_flags_and_eos_penalty(tiny_lm, tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    lm = eos_biased(tiny_lm, eos)
    # the first seed whose batch has answers that end and answers that run out of budget
    ro = next(
        r for seed in range(50) if (r := rollout(lm, tokenizer, seed=seed)).ended.any() and (~r.ended).any()
    )
    B, T = ro.response.shape
    assert T <= MAX_NEW
    # queries: left-padded, prompts end where generation starts
    for b, ids in enumerate(ro.prompts.ids):
        assert ro.query[b, -len(ids) :].tolist() == ids
        assert ro.query_mask[b].tolist() == [0] * (ro.context_len - len(ids)) + [1] * len(ids)
    for b in range(B):
        n = int(ro.response_mask[b].sum())
        assert ro.response_mask[b].tolist() == [1] * n + [0] * (T - n)  # a prefix
        assert (ro.response[b, n:] == pad).all()
        valid = ro.response[b, :n].tolist()
        if ro.ended[b]:
            assert valid[-1] == eos and eos not in valid[:-1]  # the first EOS ends the answer and is kept
        else:
            assert eos not in valid and n == T == MAX_NEW  # ran out of budget
        # the answer's text is what it adds to the decoded prompt (so prompt + text re-reads as these tokens)
        prompt = tokenizer.decode(ro.prompts.ids[b], skip_special_tokens=True)
        joined = tokenizer.decode(
            ro.prompts.ids[b] + [t for t in valid if t != eos], skip_special_tokens=True
        )
        expected_text = joined[len(prompt) :]
        assert ro.texts[b] == expected_text
    assert torch.equal(ro.lengths, ro.response_mask.sum(1))
    # missing-EOS penalty on the sequence score
    raw = torch.full((B,), 0.5)
    replaced = shape_scores(raw, ro.ended, missing_eos="replace", missing_eos_penalty=1.0)
    assert torch.equal(replaced, torch.where(ro.ended, raw, torch.full_like(raw, -1.0)))
    subtracted = shape_scores(raw, ro.ended, missing_eos="subtract", missing_eos_penalty=2.0)
    assert torch.equal(subtracted, torch.where(ro.ended, raw, raw - 2.0))


def test_generate_tokens_rejects_greedy(tiny_lm, tokenizer):
    q, m = pad_sequences([[4, 5, 6]], tokenizer.pad_token_id, side="left")
    with pytest.raises(ValueError, match="temperature"):
        generate_tokens(
            tiny_lm, q, m, max_new_tokens=3, temperature=0.0, eos_id=tokenizer.eos_token_id, pad_id=0
        )


def test_generate_tokens_ignores_the_models_generation_config(tiny_lm, tokenizer):
    """generate_tokens' docstring: the model's own generation_config is ignored (pure ancestral sampling)."""
    hi = tokenizer.convert_tokens_to_ids("hi")
    tiny_lm.generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i != hi]
    q, m = pad_sequences([[4, 5, 9, 11, 12]] * 8, tokenizer.pad_token_id, side="left")
    torch.manual_seed(0)
    response, _, _ = generate_tokens(
        tiny_lm,
        q,
        m,
        max_new_tokens=6,
        temperature=1.0,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )
    assert (response != hi).any()


# ------------------------------------------------------------------ invariant 11: padding never matters


def test_logprobs_invariant_to_left_padding_of_the_query(tiny_lm, tokenizer):
    lm = eos_biased(tiny_lm, tokenizer.eos_token_id)
    ro = rollout(lm, tokenizer, 0.7, seed=1)
    base = token_logprobs(
        response_logits(lm, ro.input_ids, ro.attention_mask, ro.context_len), ro.response, 0.7
    )
    mask = ro.response_mask.bool()
    B, extra = len(ro.texts), 5
    # extra left padding, with any token id in the padded positions
    for pad_id in (tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("hello")):
        ids = torch.cat([torch.full((B, extra), pad_id), ro.input_ids], 1)
        amask = torch.cat([torch.zeros((B, extra), dtype=torch.long), ro.attention_mask], 1)
        padded = token_logprobs(response_logits(lm, ids, amask, ro.context_len + extra), ro.response, 0.7)
        assert torch.allclose(padded[mask], base[mask], atol=1e-5)
    # each row alone, with no query padding at all (trim drops the all-pad columns)
    for b in range(B):
        ids, amask, ctx = trim(ro.input_ids[b : b + 1], ro.attention_mask[b : b + 1], ro.context_len, MAX_NEW)
        assert amask[0, 0] == 1
        alone = token_logprobs(response_logits(lm, ids, amask, ctx), ro.response[b : b + 1], 0.7)
        assert torch.allclose(alone[0][mask[b]], base[b][mask[b]], atol=1e-5)


def test_actor_loss_ignores_pad_tokens_and_gives_them_no_gradient(tiny_lm, tokenizer):
    policy = eos_biased(tiny_lm, tokenizer.eos_token_id)
    ro = rollout(policy, tokenizer, seed=0)
    assert (ro.response_mask == 0).any() and (ro.query_mask == 0).any()
    B = len(ro.texts)
    with torch.no_grad():
        old = token_logprobs(
            response_logits(policy, ro.input_ids, ro.attention_mask, ro.context_len), ro.response, 1.0
        )
    torch.manual_seed(2)
    old = old + 0.3 * torch.randn_like(old)
    advantages = torch.randn(ro.response.shape)
    mb = micro_batch(ro, list(range(B)), old, advantages)

    def loss_and_grads(mb):
        policy.zero_grad()
        loss, _ = actor_loss(policy, mb, 1.0, 0.2, 0.0, None)
        loss.backward()
        return loss.detach(), grads(policy)

    loss_a, grads_a = loss_and_grads(mb)
    # other token ids, log-probs and advantages wherever the attention / response masks are 0
    other = tokenizer.convert_tokens_to_ids("yes")
    rpad = mb.response_mask == 0
    junk = dataclasses.replace(
        mb,
        ids=mb.ids.masked_fill(mb.mask == 0, other),
        response=mb.response.masked_fill(rpad, other),
        old_logprobs=mb.old_logprobs.masked_fill(rpad, -50.0),
        advantages=mb.advantages.masked_fill(rpad, 1e3),
    )
    loss_b, grads_b = loss_and_grads(junk)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-6)

    # the gradient reaching the logits at pad positions is exactly zero (at rho = 1 nothing is clipped, so every
    # real token gets one)
    logits = response_logits(policy, mb.ids, mb.mask, mb.ctx)
    logits.retain_grad()
    logprobs = token_logprobs(logits, mb.response, 1.0)
    policy_loss(logprobs, logprobs.detach(), mb.advantages, mb.response_mask).loss.backward()
    assert (logits.grad[rpad] == 0).all()
    assert (logits.grad[~rpad].abs().sum(-1) > 0).all()


# ------------------------------------------------------------------ the critic's per-token values


def test_token_values_match_the_reward_models_pooled_score(tiny_rm, tokenizer):
    seqs = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 10, 11, 12, 13, 2]]
    pad = tokenizer.pad_token_id
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    values = TokenValueModel(tiny_rm)(ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32
    pooled = tiny_rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    last = torch.tensor([len(s) - 1 for s in seqs])
    assert torch.allclose(values[torch.arange(3), last], pooled, atol=1e-5)
    # the same values with left padding (position ids count real tokens only)
    left_ids, left_mask = pad_sequences(seqs, pad, side="left")
    left = token_values(tiny_rm, left_ids, left_mask)
    for b, s in enumerate(seqs):
        assert torch.allclose(left[b, width - len(s) :], values[b, : len(s)], atol=1e-5)


# ------------------------------------------------------------------ invariant 14: PPO-ptx gradients


def test_ppo_ptx_gradients(tiny_lm, tokenizer):
    policy = eos_biased(tiny_lm, tokenizer.eos_token_id)
    disable_dropout(policy)
    temperature, clip = 0.8, 0.2
    ro = rollout(policy, tokenizer, temperature, seed=4)
    with torch.no_grad():
        logits = response_logits(policy, ro.input_ids, ro.attention_mask, ro.context_len)
        old = token_logprobs(logits, ro.response, temperature)
    torch.manual_seed(5)
    old = old + 0.3 * torch.randn_like(old)  # some tokens clipped, some not
    advantages = torch.randn(ro.response.shape)
    mb = micro_batch(ro, [4, 1, 0, 2], old, advantages)
    tokens = torch.randint(4, len(tokenizer), (3, 10))
    labels = tokens.clone()
    labels[1, 7:] = -100  # padding of a short document
    ptx = LMBatch(tokens, labels)

    # g_PPO by hand: the clipped policy loss of the same micro-batch
    policy.zero_grad()
    logprobs = token_logprobs(response_logits(policy, mb.ids, mb.mask, mb.ctx), mb.response, temperature)
    ppo = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, clip)
    assert 0 < ppo.clipfrac.item() < 1
    ppo.loss.backward()
    g_ppo = grads(policy)
    # g_LM by hand: the per-token mean NLL of the pretraining micro-batch
    policy.zero_grad()
    ptx_loss = lm_loss(policy(input_ids=tokens, use_cache=False).logits, labels)
    ptx_loss.backward()
    g_lm = grads(policy)

    # ptx_coef = 0: exactly PPO's loss and gradients, the ptx loss only reported
    policy.zero_grad()
    loss, stats = actor_loss(policy, mb, temperature, clip, 0.0, ptx)
    loss.backward()
    assert torch.equal(loss.detach(), ppo.loss.detach())
    for got, want in zip(grads(policy), g_ppo, strict=True):
        assert torch.equal(got, want)
    assert stats["ppo/ptx_loss"] == pytest.approx(ptx_loss.item(), abs=1e-6)
    assert stats["ppo/policy_loss"] == pytest.approx(ppo.loss.item(), abs=1e-7)
    assert stats["ppo/clipfrac"] == pytest.approx(ppo.clipfrac.item())

    # ptx_coef = c: g_PPO + c * g_LM
    c = 2.5
    policy.zero_grad()
    loss, _ = actor_loss(policy, mb, temperature, clip, c, ptx)
    loss.backward()
    assert loss.item() == pytest.approx(ppo.loss.item() + c * ptx_loss.item(), abs=1e-6)
    assert any(g.abs().sum() > 0 for g in g_lm)
    for got, a, b in zip(grads(policy), g_ppo, g_lm, strict=True):
        assert torch.allclose(got, a + c * b, atol=1e-6)

    # no ptx batch: plain PPO
    policy.zero_grad()
    loss, stats = actor_loss(policy, mb, temperature, clip, c, None)
    assert "ppo/ptx_loss" not in stats
    assert torch.equal(loss.detach(), ppo.loss.detach())
    # the logged entropy is that of the temperature-scaled distributions
    assert 0 < stats["ppo/entropy"] <= torch.log(torch.tensor(float(len(tokenizer)))).item() + 1e-5


# ------------------------------------------------------------------ GRPO's KL term in the loss


def test_grpo_kl_in_the_loss_is_beta_times_the_mean_k3_and_its_gradient(tiny_lm, tokenizer):
    policy = eos_biased(tiny_lm, tokenizer.eos_token_id)
    disable_dropout(policy)
    temperature, clip, beta = 1.0, 0.2, 0.3
    ro = rollout(policy, tokenizer, temperature, seed=6)
    with torch.no_grad():
        old = token_logprobs(
            response_logits(policy, ro.input_ids, ro.attention_mask, ro.context_len), ro.response, temperature
        )
    torch.manual_seed(7)
    ref = old + 0.5 * torch.randn_like(old)  # a reference the policy has moved away from
    mb = dataclasses.replace(
        micro_batch(ro, [0, 1, 2, 3], old, torch.randn(ro.response.shape)),
        ref_logprobs=ref[[0, 1, 2, 3]][:, : int(ro.response_mask[[0, 1, 2, 3]].sum(1).max())],
    )
    # by hand: PPO's loss + beta * mean over answer tokens of (rho - 1) - log rho, rho = pi_ref / pi
    policy.zero_grad()
    logprobs = token_logprobs(response_logits(policy, mb.ids, mb.mask, mb.ctx), mb.response, temperature)
    rho = torch.exp(mb.ref_logprobs - logprobs)
    k3 = ((rho - 1 - torch.log(rho)) * mb.response_mask).sum() / mb.response_mask.sum()
    want = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, clip).loss + beta * k3
    want.backward()
    g_want = grads(policy)
    policy.zero_grad()
    loss, stats = actor_loss(policy, mb, temperature, clip, 0.0, None, kl_coef=beta)
    loss.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert stats["ppo/kl_loss"] == pytest.approx(k3.item(), abs=1e-6) and k3.item() > 0
    for got, w in zip(grads(policy), g_want, strict=True):
        assert torch.allclose(got, w, atol=1e-6)
    # without the reference's log-probs there is nothing to penalise against: an error, not a silent 0
    with pytest.raises(ValueError, match="reference log-probs"):
        actor_loss(
            policy, dataclasses.replace(mb, ref_logprobs=None), temperature, clip, 0.0, None, kl_coef=beta
        )


# ------------------------------------------------------------------ dropout off


def test_disable_dropout_zeroes_modules_and_config(tokenizer):
    lm = LlamaForCausalLM(tiny_config(tokenizer, attention_dropout=0.3, hidden_dropout=0.2, resid_pdrop=0.1))
    model = torch.nn.ModuleDict({"lm": lm, "drop": torch.nn.Dropout(0.4)})
    disable_dropout(model)
    assert model["drop"].p == 0.0
    assert lm.config.attention_dropout == 0.0
    assert lm.config.hidden_dropout == 0.0
    assert lm.config.resid_pdrop == 0.0
    assert lm.config.hidden_size == 16  # other settings untouched


def test_disable_dropout_makes_train_mode_forward_deterministic(tokenizer):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_config(tokenizer, attention_dropout=0.5))
    disable_dropout(lm)
    lm.train()  # the recipe trains the actor in train mode
    x = torch.randint(4, len(tokenizer), (2, 8))
    with torch.no_grad():
        a, b = lm(input_ids=x).logits, lm(input_ids=x).logits
        c = lm.eval()(input_ids=x).logits
    assert torch.equal(a, b) and torch.equal(a, c)
