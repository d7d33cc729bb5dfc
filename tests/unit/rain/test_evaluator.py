"""Self-evaluation: judge mapping, option ids from the tokenizer, the judged text, the rollout stop rule,
and the sampling primitive every random choice goes through."""

from __future__ import annotations

import pytest
import torch

from alignlab.rain.evaluator import (
    JudgeFormat,
    current_exchange,
    cut_at_stops,
    letter_id,
    rollout_done,
    votes_to_value,
)
from alignlab.rain.proposal import next_token_probs, ranked_tokens, sample_index, top_k_probs
from alignlab.rain.stage_config import TINYHH_JUDGE_TEMPLATE, RainJudgeConfig
from alignlab.tinyhh.emitters import JUDGE_OPTIONS, JUDGE_TEMPLATE, judge_answer, judge_prompt
from tests.unit.rain.stub import CODEC, TEMPLATE, stub_judge


def logits_for(a: float, b: float, judge: JudgeFormat, vocab: int = 80) -> torch.Tensor:
    row = torch.zeros(vocab)
    row[judge.letter_ids[0]], row[judge.letter_ids[1]] = a, b
    return row


def test_judge_mapping_both_orders():
    judge = stub_judge()
    (p1, s1), (p2, s2) = judge.prompts("\n\nHuman: hi\n\nAssistant: yo")
    assert "|safe/bad=" in p1 and "|bad/safe=" in p2 and (s1, s2) == (0, 1)
    harmless_1, harmful_1 = logits_for(2.0, 0.0, judge), logits_for(0.0, 2.0, judge)  # ordering 1: a = good
    harmless_2, harmful_2 = logits_for(0.0, 2.0, judge), logits_for(2.0, 0.0, judge)  # ordering 2: b = good
    assert judge.value(torch.stack([harmless_1, harmless_2]), [0, 1]) == 1.0
    assert judge.value(torch.stack([harmful_1, harmful_2]), [0, 1]) == -1.0
    assert judge.value(torch.stack([harmless_1, harmful_2]), [0, 1]) == 0.0
    assert judge.value(torch.stack([harmful_1, harmless_2]), [0, 1]) == 0.0
    tie = logits_for(1.0, 1.0, judge)
    assert judge.value(torch.stack([tie, tie]), [0, 1]) == -1.0  # a tie is no vote for harmless (strict >)
    assert [votes_to_value(v) for v in ([1, 1], [0, 0], [1, 0])] == [1.0, -1.0, 0.0]


def test_judge_single_pass():
    judge = JudgeFormat(TEMPLATE, ("safe", "bad"), ("a", "b"), both_orders=False).bind(CODEC)
    assert len(judge.prompts("x")) == 1
    assert judge.value(logits_for(2.0, 0.0, judge)[None], [0]) == 1.0
    assert judge.value(logits_for(0.0, 2.0, judge)[None], [0]) == -1.0


def test_letters_are_looked_up_never_hard_coded():
    judge = stub_judge()
    assert judge.letter_ids == (CODEC.encode("a")[-1], CODEC.encode("b")[-1])
    with pytest.raises(ValueError, match="stage.judge.letters"):
        letter_id(CODEC, "context", "ab")  # two tokens in the char codec
    with pytest.raises(ValueError, match="dialogue"):
        JudgeFormat("no slot", ("a", "b"), ("a", "b"), True)


def test_default_template_is_tinyhh_judge_format():
    assert TINYHH_JUDGE_TEMPLATE == JUDGE_TEMPLATE and RainJudgeConfig().options == list(JUDGE_OPTIONS)
    judge = JudgeFormat(TINYHH_JUDGE_TEMPLATE, tuple(JUDGE_OPTIONS), ("A", "B"), True)
    dialogue = "\n\nHuman: how do i rob a bank?\n\nAssistant: Sure."
    (p1, s1), (p2, s2) = judge.prompts(dialogue)
    assert p1 == judge_prompt(dialogue, harmless_first=True) and p2 == judge_prompt(
        dialogue, harmless_first=False
    )
    # the good option's slot letter is what TinyHH's self-evaluation examples answer for a harmless dialogue
    assert "AB"[s1] == judge_answer(False, True) and "AB"[s2] == judge_answer(False, False)
    assert judge.preamble == "Judge the chat below."


def test_judged_text_is_the_current_exchange():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do i rob a bank?\n\nAssistant:"
    assert current_exchange(prompt, "\n\nHuman:") == "\n\nHuman: how do i rob a bank?\n\nAssistant:"
    assert current_exchange("no marker", "\n\nHuman:") == "no marker"
    assert cut_at_stops(" Sure.\n\nHuman: and then?", ["\n\nHuman:"]) == " Sure."


def test_rollout_stop_characters():
    stops = ",.?:;\n"
    for text in ("Sure.", "Well,", "Why?", "Assistant:", "a;", "line\n"):
        assert rollout_done(text, stops)
    for text in ("Sure", "", "ok!"):
        assert not rollout_done(text, stops)


def test_inverse_cdf_sampling_and_truncation():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25], dtype=torch.float64)
    assert [sample_index(probs, u) for u in (0.0, 0.49, 0.5, 0.74, 0.75, 0.999999)] == [1, 1, 3, 3, 4, 4]
    assert sample_index(probs / 2, 0.6) == 3  # unnormalised mass works the same
    top = top_k_probs(torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64), 2)
    assert top.tolist() == pytest.approx([0.0, 4 / 7, 0.0, 3 / 7])
    assert ranked_tokens(torch.tensor([0.1, 0.4, 0.2, 0.3]), 3) == [
        (1, pytest.approx(0.4)),
        (3, pytest.approx(0.3)),
        (2, pytest.approx(0.2)),
    ]
    assert next_token_probs(torch.zeros(4)).dtype == torch.float64
