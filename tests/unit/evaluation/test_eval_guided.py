"""stage=eval's reward-guided decodings (recipes/eval.py: guided): what the reward model is asked to score."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaForSequenceClassification

from alignlab.config import SystemConfig
from alignlab.data.examples import decode_answer, prompt_ids
from alignlab.generation import cut_at_stop
from alignlab.guided import args_decode
from alignlab.recipes.eval import guided
from alignlab.scoring import RewardScorer
from tests.unit.conftest import tiny_config, word_tokenizer


class ScriptedScorer:
    """A reward scorer that likes the token `yes`, and records what it was asked."""

    def __init__(self, tokenizer, kind="single"):
        self.tokenizer, self.kind, self.calls = tokenizer, kind, []
        self.good = tokenizer.convert_tokens_to_ids("yes")

    def score_ids(self, sequences, is_safety=None):
        self.calls.append((sequences, is_safety))
        return torch.tensor([float(s.count(self.good)) for s in sequences])


PROMPTS = [
    {"set": "benign", "prompt": "hi how like this ?"},
    {"set": "harmful", "prompt": "a b c d"},
    {"set": "attack", "prompt": "hello ?"},
]


def run(tiny_lm, tokenizer, scorer, decoding, **fields):
    sys_cfg = OmegaConf.merge(
        OmegaConf.structured(SystemConfig), {"model": "m", "decoding": decoding, **fields}
    )
    s = OmegaConf.create({"batch_size": 2, "max_new_tokens": 5})
    torch.manual_seed(0)
    return guided(sys_cfg, tiny_lm, tokenizer, PROMPTS, [p["prompt"] for p in PROMPTS], s, scorer)


def test_blockwise_scores_each_candidate_as_a_finished_answer_to_its_own_prompt(tiny_lm, tokenizer):
    scorer = ScriptedScorer(tokenizer, kind="llama2")
    answers, cost = run(tiny_lm, tokenizer, scorer, "blockwise", n=3, block_size=2)
    eos = tokenizer.eos_token_id
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert scorer.calls and cost.reward_calls == len(scorer.calls)
    for seqs, flags in scorer.calls:
        # the EOS the reward model reads its score at, once, at the end
        assert all(q[-1] == eos and eos not in q[:-1] for q in seqs)
        # each candidate continues one of the prompts, and carries that prompt's safety flag
        for q, flag in zip(seqs, flags, strict=True):
            (p,) = [p for p in PROMPTS if q[: len(own := prompt_ids(tokenizer, p["prompt"]))] == own]
            assert flag == (p["set"] != "benign")


def test_args_with_the_cached_reward_model_decodes_as_scoring_whole_sequences(tiny_lm, tokenizer, tmp_path):
    torch.manual_seed(3)
    LlamaForSequenceClassification(
        tiny_config(tokenizer, num_labels=1, initializer_range=0.3)
    ).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    scorer = RewardScorer(kind="single", reward_model=str(tmp_path / "rm"), normalize=False)
    answers, cost = run(tiny_lm, tokenizer, scorer, "args", reward_weight=5.0, top_k=6, temperature=0.0)
    # temperature 0: ARGS-greedy. The same decoding with every candidate sequence scored whole (its EOS appended),
    # prompt by prompt
    eos = tokenizer.eos_token_id
    want = []
    for p in PROMPTS:
        query = torch.tensor([prompt_ids(tokenizer, p["prompt"])])
        out = args_decode(
            tiny_lm,
            query,
            torch.ones_like(query),
            lambda seqs: scorer.score_ids([q if q[-1] == eos else [*q, eos] for q in seqs]),
            max_new_tokens=5,
            eos_id=eos,
            pad_id=tokenizer.pad_token_id,
            k=6,
            w=5.0,
        )
        tokens = [t for t in out.response[0][out.response_mask[0].bool()].tolist() if t != eos]
        want.append(cut_at_stop(decode_answer(tokenizer, tokens)))
    assert answers == want
    greedy, _ = run(tiny_lm, tokenizer, scorer, "args", reward_weight=0.0, top_k=6, temperature=0.0)
    assert answers != greedy  # the reward changed the answers
    assert cost.reward_calls > 0 and cost.reward_tokens > 0


def test_a_reward_model_with_another_tokenizer_is_a_clear_error(tiny_lm, tokenizer):
    other = word_tokenizer(pad_is_eos=True)
    with pytest.raises(ValueError, match="tokenizer"):
        run(tiny_lm, tokenizer, ScriptedScorer(other), "args")
