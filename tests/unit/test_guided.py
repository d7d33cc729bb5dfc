"""Reward-guided decoding (alignlab/guided.py): ARGS and blockwise best-of-K against hand values.

The scripted policy's next-token distribution depends only on the last token (a fixed table), so every choice can
be worked out by hand from the table and a scripted reward (+1 per GOOD token, -1 per BAD one); a tiny float64
Llama checks the KV cache and left padding (batched rows decode as each row alone).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from alignlab.generation import _rollout_cache, generate_tokens
from alignlab.guided import args_decode, args_pick, args_scores, best_of_block, blockwise_decode
from alignlab.tensors import pad_sequences
from tests.unit.conftest import tiny_config, word_tokenizer

PAD, EOS, GOOD, BAD, A, B = range(6)
V = 6

# next-token probabilities after each last token (unlisted: probability 0)
MAIN = {
    A: {EOS: 0.05, GOOD: 0.25, BAD: 0.4, A: 0.11, B: 0.19},  # greedy: BAD
    BAD: {EOS: 0.12, GOOD: 0.1, BAD: 0.09, A: 0.09, B: 0.6},  # greedy: B
    B: {EOS: 0.5, GOOD: 0.2, BAD: 0.12, A: 0.1, B: 0.08},  # greedy: EOS
    GOOD: {EOS: 0.3, GOOD: 0.05, BAD: 0.05, A: 0.11, B: 0.49},  # greedy: B
}
DETERMINISTIC = {A: {GOOD: 1.0}, GOOD: {B: 1.0}, B: {EOS: 1.0}, BAD: {EOS: 1.0}}
NO_EOS = {t: {GOOD: 0.3, BAD: 0.3, A: 0.2, B: 0.2} for t in (A, B, GOOD, BAD)}


class TableLM(torch.nn.Module):
    """HF causal-LM call signature; logits [B, L, V] = log table[token]. No config, no cache (returns what it got)."""

    def __init__(self, table: dict[int, dict[int, float]]):
        super().__init__()
        logits = torch.full((V, V), -math.inf)
        for last in range(V):
            for nxt, p in table.get(last, table[A]).items():
                logits[last, nxt] = math.log(p)
        self.table = logits

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False
    ):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=past_key_values)


def reward(seq: list[int]) -> float:
    return float(seq.count(GOOD) - seq.count(BAD))


class Recorder:
    """A scripted score_fn that keeps every call's sequences."""

    def __init__(self, fn=reward):
        self.fn, self.calls = fn, []

    def __call__(self, seqs: list[list[int]]) -> torch.Tensor:
        self.calls.append([list(s) for s in seqs])
        return torch.tensor([self.fn(s) for s in seqs])


def no_reward(seqs):
    raise AssertionError("score_fn must not be called")


def batch(prompts: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_sequences(prompts, pad, "left")


def answers(out) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(out.response, out.response_mask, strict=True)]


def args_run(lm, prompts, score_fn, **kw):
    q, m = batch(prompts)
    return args_decode(lm, q, m, score_fn, eos_id=EOS, pad_id=PAD, **kw)


def blockwise_run(lm, prompts, score_fn, **kw):
    q, m = batch(prompts)
    return blockwise_decode(lm, q, m, score_fn, eos_id=EOS, pad_id=PAD, **kw)


def test_scripted_policy_gets_no_preallocated_cache():
    assert _rollout_cache(TableLM(MAIN), 8) is None  # no .config: HF's path, here a stateless model


# ------------------------------------------------------------------ pure pieces


def test_args_scores_hand_values():
    lp = torch.tensor([[math.log(0.4), math.log(0.25)], [-1.0, -2.0]])
    r = torch.tensor([[-1.0, 1.0], [0.5, 3.0]])
    expected = torch.tensor([[math.log(0.4) - 0.3, math.log(0.25) + 0.3], [-0.85, -1.1]])
    torch.testing.assert_close(args_scores(lp, r, 0.3), expected)


def test_greedy_picks_and_best_of_block_break_ties_to_the_lowest_index():
    scores = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [0.0, -1.0, 5.0]])
    assert args_pick(scores).tolist() == [1, 0, 2]
    assert best_of_block(scores).tolist() == [1, 0, 2]


def test_sample_pick_is_the_inverse_cdf_of_softmax_scores_over_temperature():
    scores = torch.tensor([[0.0, math.log(3.0)]])  # softmax: [0.25, 0.75]; at T=0.5: [0.1, 0.9]
    pick = lambda u, t: args_pick(scores, "sample", t, torch.tensor([[u]])).item()
    assert (pick(0.2, 1.0), pick(0.3, 1.0)) == (0, 1)
    assert (pick(0.09, 0.5), pick(0.15, 0.5)) == (0, 1)


# ------------------------------------------------------------------ ARGS


def test_args_with_w0_is_greedy_decoding_and_calls_no_reward():
    out = args_run(TableLM(MAIN), [[A], [B, GOOD], [B]], no_reward, max_new_tokens=5, k=3, w=0.0)
    # hand greedy chains from the table: A -> BAD -> B -> EOS; GOOD -> B -> EOS; B -> EOS
    assert answers(out) == [[BAD, B, EOS], [B, EOS], [EOS]]
    assert out.response.tolist() == [[BAD, B, EOS], [B, EOS, PAD], [EOS, PAD, PAD]]
    assert out.ended.tolist() == [True, True, True]
    assert out.cost.reward_calls == 0


def test_args_with_large_w_takes_the_good_token_the_policy_ranks_below_the_bad_one():
    out = args_run(TableLM(MAIN), [[A]], Recorder(), max_new_tokens=6, k=3, w=10.0)
    # step 1: top-3 after A are BAD .4, GOOD .25, B .19: the reward decides (GOOD); after GOOD all candidates tie
    # on reward and B is the likeliest; after B, GOOD (+1) beats EOS (.5) and BAD; and so on to the budget
    assert answers(out) == [[GOOD, B, GOOD, B, GOOD, B]]
    assert out.ended.tolist() == [False] and out.response_mask.tolist() == [[1] * 6]


@pytest.mark.parametrize("w, expected", [(0.2, BAD), (0.3, GOOD)])
def test_args_one_step_trade_off_matches_log_p_plus_w_r(w, expected):
    # GOOD beats BAD iff log .25 + w > log .4 - w, i.e. w > log(1.6) / 2 = 0.235; B (log .19, r=0) never wins here
    rec = Recorder()
    out = args_run(TableLM(MAIN), [[A]], rec, max_new_tokens=1, k=3, w=w)
    assert answers(out) == [[expected]]
    assert rec.calls == [
        [[A, BAD], [A, GOOD], [A, B]]
    ]  # the top-3 by logit, each scored as prompt + candidate


def test_args_sample_mode_draws_from_softmax_of_the_scores():
    n, w = 4000, 0.3
    torch.manual_seed(0)
    out = args_run(TableLM(MAIN), [[A]] * n, Recorder(), max_new_tokens=1, k=3, w=w, mode="sample")
    weights = torch.tensor([0.4 * math.exp(-w), 0.25 * math.exp(w), 0.19])  # BAD, GOOD, B: p * exp(w r)
    probs = weights / weights.sum()
    counts = torch.stack([(out.response[:, 0] == t).sum() for t in (BAD, GOOD, B)]).double()
    assert counts.sum() == n
    assert ((counts / n - probs).abs() < 4 * (probs * (1 - probs) / n).sqrt()).all()


def test_args_costs_and_eos_match_hand_counts():
    """w=0.1, k=3. Row [A]: BAD (log .4 - .1 > log .25 + .1), B, EOS (log .5 - .1 > log .2 + 0). Row [GOOD, B]
    ends at once: EOS (log .5 + .1 > log .2 + .2). Finished rows leave the batch and are scored no more."""
    rec = Recorder()
    out = args_run(TableLM(MAIN), [[A], [GOOD, B]], rec, max_new_tokens=8, k=3, w=0.1)
    assert out.response.tolist() == [[BAD, B, EOS], [EOS, PAD, PAD]]
    assert out.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out.ended.tolist() == [True, True]
    c = out.cost
    # policy: the 2 x 2 left-padded prompt, then one token for the one row left, twice
    assert (c.policy_forwards, c.policy_tokens) == (3, 4 + 1 + 1)
    # reward: step 1 scores 3 candidates per row (lengths 2 and 3), then 3 candidates of lengths 3, then 4
    assert (c.reward_calls, c.reward_sequences, c.reward_tokens) == (3, 12, 3 * 2 + 3 * 3 + 3 * 3 + 3 * 4)
    assert rec.calls[0][3:] == [[GOOD, B, EOS], [GOOD, B, GOOD], [GOOD, B, BAD]]  # EOS is a candidate
    assert all(s[:2] != [GOOD, B] for call in rec.calls[1:] for s in call)
    assert all(EOS not in s[:-1] for call in rec.calls for s in call)


def test_score_fn_returning_the_wrong_number_of_scores_is_an_error():
    with pytest.raises(ValueError, match="score_fn returned 1 scores for 3"):
        args_run(TableLM(MAIN), [[A]], lambda seqs: torch.zeros(1), max_new_tokens=1, k=3)


# ------------------------------------------------------------------ blockwise best-of-K


def test_blockwise_k1_is_plain_sampling_from_the_same_seed():
    """One row: the same uniforms as one generate_tokens call (one per row and step), over blocks of 3."""
    lm, q, m = TableLM(MAIN), *batch([[A]])
    lengths = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = blockwise_decode(
            lm, q, m, no_reward, max_new_tokens=7, eos_id=EOS, pad_id=PAD, num_candidates=1, block_size=3
        )
        torch.manual_seed(seed)
        ref, ref_mask, ref_ended = generate_tokens(
            lm, q, m, max_new_tokens=7, temperature=1.0, eos_id=EOS, pad_id=PAD
        )
        assert torch.equal(out.response, ref) and torch.equal(out.response_mask, ref_mask)
        assert torch.equal(out.ended, ref_ended)
        lengths.append(int(ref_mask.sum()))
    assert max(lengths) > 3 and min(lengths) < 3  # several blocks, and answers ending inside the first


def test_blockwise_k1_batch_is_plain_sampling_while_no_row_ends():
    """A batch draws one uniform per row per step in both; a row that ended would leave the later blocks (fewer
    draws per step), so the invariant is checked on a policy that never emits EOS."""
    lm, q, m = TableLM(NO_EOS), *batch([[A], [B, GOOD, A], [GOOD, B]])
    torch.manual_seed(3)
    out = blockwise_decode(
        lm, q, m, no_reward, max_new_tokens=7, eos_id=EOS, pad_id=PAD, num_candidates=1, block_size=3
    )
    torch.manual_seed(3)
    ref, _, _ = generate_tokens(lm, q, m, max_new_tokens=7, temperature=1.0, eos_id=EOS, pad_id=PAD)
    assert torch.equal(out.response, ref) and out.response.shape == (3, 7)


def reference_blockwise(lm, prompt: list[int], seed: int, k: int, block: int, max_new: int) -> list[int]:
    """By hand: K samples of a block from the same seed (generate_tokens on K copies), keep the first best."""
    torch.manual_seed(seed)
    answer: list[int] = []
    while len(answer) < max_new and EOS not in answer:
        q, m = batch([prompt + answer] * k)
        r, rm, _ = generate_tokens(
            lm,
            q,
            m,
            max_new_tokens=min(block, max_new - len(answer)),
            temperature=1.0,
            eos_id=EOS,
            pad_id=PAD,
        )
        conts = [row[mk.bool()].tolist() for row, mk in zip(r, rm, strict=True)]
        rewards = [reward(prompt + answer + c) for c in conts]
        answer += conts[rewards.index(max(rewards))]
    return answer


@pytest.mark.parametrize("k, block, max_new", [(8, 4, 4), (4, 2, 6)])
def test_blockwise_keeps_the_highest_reward_continuation(k, block, max_new):
    lm, q, m = TableLM(MAIN), *batch([[A]])
    not_first = False
    for seed in range(10):
        torch.manual_seed(seed)
        rec = Recorder()
        out = blockwise_decode(
            lm, q, m, rec, max_new_tokens=max_new, eos_id=EOS, pad_id=PAD, num_candidates=k, block_size=block
        )
        assert answers(out) == [reference_blockwise(lm, [A], seed, k, block, max_new)]
        first_block = [reward(s) for s in rec.calls[0]]
        assert reward([A] + answers(out)[0][:block]) == max(first_block)
        not_first |= first_block.index(max(first_block)) > 0
    assert not_first  # the best was not always the first sample: the choice is tested


def test_blockwise_costs_and_eos_match_hand_counts():
    """K=2, block 2, a deterministic policy (A -> GOOD -> B -> EOS, B -> EOS)."""
    rec = Recorder()
    out = blockwise_run(
        TableLM(DETERMINISTIC), [[B], [A]], rec, max_new_tokens=4, num_candidates=2, block_size=2
    )
    assert out.response.tolist() == [[EOS, PAD, PAD], [GOOD, B, EOS]]
    assert out.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]] and out.ended.tolist() == [True, True]
    c = out.cost
    # block 1: 4 rows (2 per prompt) x 1 prompt token, then all 4 fed again (a stateless policy's rows are not
    # compacted by generate_tokens); block 2: row [B] is done, [A]'s 2 prefixes of 3 re-encoded, and both end at once
    assert (c.policy_forwards, c.policy_tokens) == (3, 4 + 4 + 2 * 3)
    assert rec.calls == [[[B, EOS]] * 2 + [[A, GOOD, B]] * 2, [[A, GOOD, B, EOS]] * 2]
    assert (c.reward_calls, c.reward_sequences, c.reward_tokens) == (2, 6, 2 * 2 + 2 * 3 + 2 * 4)


def test_blockwise_last_block_is_cut_to_the_budget():
    out = blockwise_run(
        TableLM(NO_EOS), [[A], [B]], Recorder(), max_new_tokens=5, num_candidates=2, block_size=3
    )
    assert out.response.shape == (2, 5) and not out.ended.any() and out.response_mask.all()


# ------------------------------------------------------------------ a real model: KV cache, left padding


@pytest.fixture(scope="module")
def llama():
    tok = word_tokenizer()
    torch.manual_seed(0)
    # weights large enough that attention, and so positions, shape the logits (at 0.02 it is nearly uniform)
    return tok, LlamaForCausalLM(tiny_config(tok, initializer_range=0.3)).double().eval()


def llama_prompts(tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in ("Human : hi", "Human : how like this ? Assistant :", "a b")]


def llama_reward(tok):
    """+1 per "yes", -1 per "no", +4 for an EOS once the sequence is 10 tokens long: rows end at different steps."""
    good, bad, eos = *tok.convert_tokens_to_ids(["yes", "no"]), tok.eos_token_id
    return lambda s: float(s.count(good) - s.count(bad) + (4 if s[-1] == eos and len(s) >= 10 else 0))


def test_args_w0_on_llama_is_greedy_by_full_forwards(llama):
    tok, lm = llama
    prompts = llama_prompts(tok)
    q, m = pad_sequences(prompts, tok.pad_token_id, "left")
    out = args_decode(
        lm, q, m, no_reward, max_new_tokens=5, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, w=0.0
    )
    for prompt, got in zip(prompts, answers(out), strict=True):
        seq = list(prompt)
        for _ in range(len(got)):
            seq.append(int(lm(torch.tensor([seq])).logits[0, -1].argmax()))
        assert got == seq[len(prompt) :]


def llama_run(lm, tok, decode, prompts):
    kw = {"max_new_tokens": 8, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id}
    q, m = pad_sequences(prompts, tok.pad_token_id, "left")
    score = Recorder(llama_reward(tok))
    if decode == "args":
        return args_decode(lm, q, m, score, k=len(tok), w=1.0, **kw)
    return blockwise_decode(lm, q, m, score, num_candidates=2, block_size=3, temperature=1e-6, **kw)


@pytest.mark.parametrize("decode", ["args", "blockwise"])
def test_batched_rows_decode_as_each_row_alone(llama, decode):
    """ARGS greedy is deterministic; blockwise samples, and a batch shares the random stream, so it is compared
    at a temperature where sampling is the argmax: the blocks' left-padded, re-encoded prefixes are what is tested."""
    tok, lm = llama
    prompts = llama_prompts(tok)
    together = answers(llama_run(lm, tok, decode, prompts))
    alone = [answers(llama_run(lm, tok, decode, [p]))[0] for p in prompts]
    assert together == alone
    assert len({tuple(a) for a in alone}) == len(alone)  # the rows differ: a mix-up would show


def test_args_finished_rows_leave_the_batch_and_its_kv_cache(llama):
    tok, lm = llama
    assert _rollout_cache(lm, 8) is not None  # the preallocated cache, compacted as rows end
    prompts = llama_prompts(tok)
    out = llama_run(lm, tok, "args", prompts)
    lengths = out.response_mask.sum(1).tolist()
    assert out.ended.any() and len(set(lengths)) == len(lengths)  # rows end at different steps
    greedy = args_decode(
        lm,
        *pad_sequences(prompts, tok.pad_token_id, "left"),
        no_reward,
        max_new_tokens=8,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        w=0.0,
    )
    assert answers(greedy) != answers(out)  # the reward changed the answers
    # the padded prompts, then one token per row still unfinished at each later step
    width = max(len(p) for p in prompts)
    fed = len(prompts) * width + sum(sum(n > s for n in lengths) for s in range(1, max(lengths)))
    assert (out.cost.policy_forwards, out.cost.policy_tokens) == (max(lengths), fed)
    assert out.cost.reward_sequences == len(tok) * sum(
        lengths
    )  # k = the whole vocabulary, unfinished rows only


# ------------------------------------------------------------------ argument validation


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"k": 0}, "k=0"),
        ({"w": -1.0}, "w=-1.0"),
        ({"w": math.nan}, "w=nan"),
        ({"mode": "beam"}, "mode='beam'"),
        ({"mode": "sample", "temperature": 0.0}, "temperature=0.0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ],
)
def test_args_rejects_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        args_run(TableLM(MAIN), [[A]], Recorder(), **({"max_new_tokens": 2} | kw))


def test_args_greedy_ignores_temperature():
    out = args_run(TableLM(MAIN), [[A]], no_reward, max_new_tokens=1, k=3, w=0.0, temperature=0.0)
    assert answers(out) == [[BAD]]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"num_candidates": 0}, "num_candidates=0"),
        ({"block_size": 0}, "block_size=0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ],
)
def test_blockwise_rejects_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        blockwise_run(TableLM(MAIN), [[A]], Recorder(), **({"max_new_tokens": 2} | kw))
