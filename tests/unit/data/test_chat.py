"""Conversations rendered in each model family's own format, tokenized as the joined text (issue 18, items 5-6).

On random-init stand-ins of GPT-NeoX, Llama 2 (SentencePiece-style), Qwen2 (ChatML template) and GPT-2 tokenizers
built in tests/zoo/families.py: the ids of prompt + answer are the tokenizer's ids of the joined text, answer masks
follow the rendered assistant turns, and a chat template's end-of-turn token is the EOS.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from alignlab.data import chat
from alignlab.data.examples import decode_answer, encode, prompt_ids, sequence_ids, sft_example
from tests.zoo.families import FAMILIES, build

PROMPT = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
ANSWER = " I am fine."


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {f: build(f, root) for f in FAMILIES}


def tok(zoo, family):
    t = AutoTokenizer.from_pretrained(zoo[family])
    if t.pad_token is None:
        t.pad_token = t.eos_token
    return t


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train_on", ["last_turn", "all_assistant_turns"])
def test_ids_of_prompt_plus_answer_are_the_joined_texts_ids(zoo, family, train_on):
    t = tok(zoo, family)
    ex = sft_example(t, PROMPT, ANSWER, train_on)
    text = chat.render_prompt(t, PROMPT) + chat.render_answer(t, PROMPT, ANSWER)
    plain = t(text, add_special_tokens=True)["input_ids"]  # the tokenizer's own ids of the joined text
    assert ex["input_ids"] == plain + [t.eos_token_id]
    assert sequence_ids(t, PROMPT, ANSWER) == plain + [t.eos_token_id]
    # the prompt as rollouts feed it is a prefix, and the trained tokens decode to the answer exactly
    p = prompt_ids(t, PROMPT)
    assert ex["input_ids"][: len(p)] == p
    n_answer = len(ex["input_ids"]) - len(p)
    assert ex["completion_mask"][-n_answer:] == [1] * n_answer
    assert decode_answer(t, ex["input_ids"][len(p) : -1]) == chat.render_answer(t, PROMPT, ANSWER)


def test_sentencepiece_boundary_has_no_extra_space(zoo):
    t = tok(zoo, "llama")
    ids = sft_example(t, PROMPT, ANSWER)["input_ids"]
    pieces = t.convert_ids_to_tokens(ids)
    assert "▁" not in pieces  # tokenizing prompt and answer apart gave a lone "▁" before " I"
    apart = (
        t("Assistant:", add_special_tokens=False)["input_ids"]
        + t(" I", add_special_tokens=False)["input_ids"]
    )
    assert "▁" in t.convert_ids_to_tokens(apart)  # the bug this guards against is real for this tokenizer
    answer = t("I am", add_special_tokens=False)[
        "input_ids"
    ]  # "▁I ▁am": what a model samples after "Assistant:"
    assert decode_answer(t, answer) == " I am"
    assert t.decode(answer) == "I am"  # decoded alone, the leading space is lost ("Assistant:I am" to the RM)


def test_chat_template_renders_turns_and_ends_answers_with_end_of_turn(zoo):
    t = tok(zoo, "qwen2")
    fmt = chat.use(t, "auto")
    assert fmt.kind == "template" and t.convert_ids_to_tokens(fmt.eos_id) == "<|im_end|>"
    rendered = chat.render_prompt(t, PROMPT)
    assert rendered == t.apply_chat_template(
        [
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    ex = sft_example(t, PROMPT, ANSWER, "all_assistant_turns")
    trained = [
        p for p, m in zip(t.convert_ids_to_tokens(ex["input_ids"]), ex["completion_mask"], strict=True) if m
    ]
    # both answers (no leading space: the role header ends the line) and each one's end-of-turn token
    assert t.convert_tokens_to_string(trained) == "hello<|im_end|>I am fine.<|im_end|>"
    last = sft_example(t, PROMPT, ANSWER)
    trained = [
        p
        for p, m in zip(t.convert_ids_to_tokens(last["input_ids"]), last["completion_mask"], strict=True)
        if m
    ]
    assert t.convert_tokens_to_string(trained) == "I am fine.<|im_end|>"


def test_system_turn_reaches_the_template_and_hh(zoo):
    t = tok(zoo, "qwen2")
    prompt = (
        "Be brief.\n\nHuman: hi\n\nAssistant:"  # HH form of [system, user]: a CD preprompt looks the same
    )
    assert chat.render_prompt(t, prompt).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi"
    )
    g = tok(zoo, "gpt2")
    assert chat.render_prompt(g, prompt) == prompt


def test_modes_hh_and_none_and_their_record(zoo, tmp_path):
    t = tok(zoo, "qwen2")
    assert chat.use(t, "hh").kind == "hh" and chat.render_prompt(t, PROMPT) == PROMPT
    t.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert chat.format_of(again).kind == "hh"  # the rendering a model was trained with travels with it
    n = tok(zoo, "gpt2")
    chat.use(n, "none")
    assert chat.render_prompt(n, "\n\nHuman: summarise this\n\nAssistant:") == "summarise this\n\n"
    with pytest.raises(ValueError, match="single-turn"):
        chat.render_prompt(n, PROMPT)
    with pytest.raises(ValueError, match="chat_template"):
        chat.use(n, "jinja")
    plain = "TL;DR of the post:"  # not an HH transcript: verbatim in every mode
    for mode in ("auto", "hh", "none"):
        q = tok(zoo, "qwen2")
        chat.use(q, mode)
        assert chat.render_prompt(q, plain) == plain and chat.render_answer(q, plain, " x") == " x"


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_encoding_adds_bos_once(zoo, family):
    t = tok(zoo, family)
    ids = encode(t, "hello")
    if family == "llama":
        assert ids[0] == t.bos_token_id and encode(t, "<s>hello").count(t.bos_token_id) == 1
    assert ids.count(t.eos_token_id) == 0 or t.eos_token_id == t.bos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_rain_reads_prompts_and_judges_answers_as_the_stages_tokenize(zoo, family):
    """RAIN's codec: the prompt in the model's format, an answer decoded as the prompt's continuation, so the
    judged dialogue (prompt + answer text) re-reads as the model's tokens."""
    from alignlab.rain.lm import HFCodec

    t = tok(zoo, family)
    codec = HFCodec(t)
    ids = prompt_ids(t, PROMPT)
    assert codec.encode(PROMPT) == ids
    full = sequence_ids(t, PROMPT, ANSWER)[:-1]  # the tokenizer's ids of prompt + answer, EOS aside
    answer = codec.decode(full[len(ids) :])
    assert answer == chat.render_answer(t, PROMPT, ANSWER)
    assert encode(t, chat.render_prompt(t, PROMPT) + answer) == full
