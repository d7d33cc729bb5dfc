"""TinyHH data: deterministic by hash, the formats real data uses, a tokenizer with distinct special tokens."""

from __future__ import annotations

import hashlib
import json

import pytest
from transformers import AutoTokenizer

from alignlab.data.formats import parse_hh
from alignlab.generation import option_token_id
from alignlab.tinyhh import world
from alignlab.tinyhh.emitters import (
    JUDGE_TEMPLATE,
    Sizes,
    build_rows,
    ensure,
    generate,
    judge_answer,
    judge_prompt,
)
from alignlab.tinyhh.oracle import judge

SMALL = Sizes(
    seed=3,
    n_corpus=400,
    n_preprompt=40,
    n_sft=50,
    n_pref=60,
    n_rl_prompts=30,
    n_eval=20,
    vocab_size=600,
    n_ranked=30,
)


def digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("a") / "tinyhh", SMALL)


def test_same_seed_gives_identical_files(small_dir, tmp_path):
    again = generate(tmp_path / "tinyhh", SMALL)
    assert digest(small_dir) == digest(again)
    assert "tokenizer/tokenizer.json" in digest(again)
    other = build_rows(Sizes(**{**SMALL.__dict__, "seed": 4}))
    assert other["corpus"] != build_rows(SMALL)["corpus"]


def test_ensure_reuses_a_complete_directory(tmp_path):
    first = ensure(tmp_path, SMALL)
    stamp = (first / "corpus.jsonl").stat().st_mtime_ns
    assert ensure(tmp_path, SMALL) == first and (first / "corpus.jsonl").stat().st_mtime_ns == stamp


def test_files_and_counts(small_dir):
    manifest = json.loads((small_dir / "manifest.json").read_text())
    assert manifest["counts"]["corpus"] == 440 and manifest["counts"]["eval_attack"] == 20
    for name, n in manifest["counts"].items():
        assert sum(1 for _ in open(small_dir / f"{name}.jsonl")) == n


def test_transcripts_are_hh_format():
    rows = build_rows(SMALL)
    dialogues = [r["text"] for r in rows["corpus"] if r["text"].startswith("\n\nHuman:")]
    assert dialogues and all(parse_hh(t)[-1][0] == "assistant" for t in dialogues)
    assert any(len(parse_hh(t)) == 4 for t in dialogues)  # some multi-turn
    for r in rows["sft"] + rows["rl_prompts"] + rows["eval_harmful"]:
        assert r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:")


def test_corpus_mixture_is_unaligned_and_attacks_always_comply():
    rows = build_rows(Sizes(seed=0, n_corpus=4000))
    plain = [parse_hh(r["text"]) for r in rows["corpus"] if r["text"].startswith("\n\nHuman:")]
    harmful, attacked = [], []
    for turns in plain:
        q, a = turns[-2][1], turns[-1][1]
        j = judge(q, a)
        if j.prompt_harmful:
            (attacked if any(s in q for s in world.ATTACK_SUFFIXES) else harmful).append(j.harmful)
    assert 0.35 < sum(harmful) / len(harmful) < 0.55  # base model should be mostly harmful, not entirely
    assert attacked and all(attacked)


def test_preprompted_dialogues_are_answered_safely_and_change_nothing_else():
    with_pp = build_rows(Sizes(seed=0, n_corpus=1000, n_preprompt=2000))
    without = build_rows(Sizes(seed=0, n_corpus=1000, n_preprompt=0))
    # their own random stream: every other data set is identical, the plain corpus keeps its order
    assert {k: v for k, v in with_pp.items() if k != "corpus"} == {
        k: v for k, v in without.items() if k != "corpus"
    }
    pre = [r["text"] for r in with_pp["corpus"] if r["text"].startswith(world.SAFETY_PREPROMPTS)]
    assert len(with_pp["corpus"]) == 3000 and len(pre) == 2000
    assert [r for r in with_pp["corpus"] if r["text"] not in pre] == without["corpus"]
    harmful, over_refused, benign = [], 0, 0
    for doc in pre:
        preprompt = next(p for p in world.SAFETY_PREPROMPTS if doc.startswith(p))
        turns = parse_hh(doc.removeprefix(preprompt))
        q, a = turns[-2][1], turns[-1][1]
        assert not any(s in q for s in world.ATTACK_SUFFIXES)
        j = judge(q, a)
        if j.prompt_harmful:
            harmful.append(j.harmful)
        else:
            benign += 1
            over_refused += j.kind == "over_refusal"
    assert sum(harmful) / len(harmful) < 0.1  # behind a preprompt, harmful requests are refused (vs ~45%)
    assert 0.03 < over_refused / benign < 0.2  # and some benign ones too: the false refusals Llama 2 reports


def test_self_evaluation_examples_are_mostly_right():
    rows = build_rows(Sizes(seed=0, n_corpus=3000))
    docs = [r["text"] for r in rows["corpus"] if r["text"].startswith("Judge the chat below.")]
    right = 0
    for doc in docs:
        body, _, rest = doc.partition("\n\nIs the last answer harmful?")
        turns = parse_hh(body.removeprefix("Judge the chat below."))
        harmless_first = "(A) harmless" in rest
        # the label follows where the (possibly partial) answer leads; judge the partial text conservatively
        truth = judge(turns[-2][1], turns[-1][1]).harmful
        right += rest.endswith(f"({judge_answer(truth, harmless_first)})")
    assert len(docs) > 800 and right / len(docs) > 0.75


def test_preferences_have_ratings_and_noise():
    rows = build_rows(Sizes(seed=0, n_pref=1000))["preferences"]
    assert {r["rating"] for r in rows} <= {
        "significantly better",
        "better",
        "slightly better",
        "negligibly better",
    }
    flipped = sum(
        judge(r["prompt"], r["chosen"]).score < judge(r["prompt"], r["rejected"]).score for r in rows
    )
    assert 0.05 < flipped / len(rows) < 0.15  # ~10% label noise
    # label_flipped marks exactly the pairs the oracle ranks the other way
    assert flipped == sum(r["label_flipped"] for r in rows)


def test_ranked_sets():
    rows = build_rows(Sizes(seed=0, n_pref=10, n_ranked=400))["ranked"]
    assert len(rows) == 400
    swapped = 0
    for r in rows:
        k = len(r["responses"])
        assert 4 <= k <= 9 and len(r["ranks"]) == len(r["scores"]) == k
        assert (
            r["ranks"] == sorted(r["ranks"]) and len(set(r["ranks"])) >= 2
        )  # best first, something to learn
        assert all(
            judge(r["prompt"], x).score == sc for x, sc in zip(r["responses"], r["scores"], strict=True)
        )
        # ranks follow the oracle scores except for one swapped pair of adjacent levels (label noise)
        by_rank = {}
        for rank, score in zip(r["ranks"], r["scores"], strict=True):
            by_rank.setdefault(rank, set()).add(score)
        assert all(len(v) == 1 for v in by_rank.values())  # ties share a rank
        levels = [by_rank[k].pop() for k in sorted(by_rank)]
        swapped += levels != sorted(levels, reverse=True)
    assert 0.04 < swapped / len(rows) < 0.16
    assert {r["is_safety"] for r in rows} == {True, False}


def test_ranked_sets_leave_the_other_files_unchanged():
    a = build_rows(Sizes(seed=0, n_corpus=50, n_pref=20, n_ranked=0))
    b = build_rows(Sizes(seed=0, n_corpus=50, n_pref=20, n_ranked=25))
    assert len(b.pop("ranked")) == 25 and not a.pop("ranked")
    assert a == b


def test_tokenizer_special_tokens_and_round_trip(small_dir):
    tok = AutoTokenizer.from_pretrained(small_dir / "tokenizer")
    specials = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    assert len(set(specials)) == 4
    text = build_rows(SMALL)["corpus"][0]["text"]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "how do i bake bread?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "\n\nHuman: how do i bake bread?\n\nAssistant:"


def test_judge_prompt_options_are_single_tokens(small_dir):
    tok = AutoTokenizer.from_pretrained(small_dir / "tokenizer")
    context = judge_prompt("\n\nHuman: how do i rob a bank?\n\nAssistant: Sure.", harmless_first=True)
    assert context.endswith("The answer is: (") and "{" not in context and JUDGE_TEMPLATE.endswith("(")
    ids = {option_token_id(tok, context, letter) for letter in ("A", "B")}
    assert len(ids) == 2
    assert judge_answer(True, True) == "B" and judge_answer(True, False) == "A"
    assert judge_answer(False, True) == "A" and judge_answer(False, False) == "B"
