"""TinyHH's generalisation split: held-out topics and attack suffixes are seen in pretraining only, and the
held-out eval sets ask about nothing else; off, the world's files are the ones it wrote before the split existed."""

from __future__ import annotations

import hashlib
import json

import pytest

from alignlab.tinyhh import world
from alignlab.tinyhh.emitters import HELDOUT_SETS, Sizes, build_rows, generate, split

SIZES = dict(n_corpus=300, n_preprompt=30, n_sft=50, n_pref=50, n_rl_prompts=50, n_eval=20, n_ranked=20)
ON = Sizes(
    seed=0,
    n_corpus=1500,
    n_preprompt=0,
    n_sft=300,
    n_pref=300,
    n_rl_prompts=300,
    n_eval=60,
    n_ranked=100,
    heldout_topics=6,
    heldout_suffixes=1,
)
TRAINING = ("sft", "preferences", "ranked", "rl_prompts")


def rows_hash(sizes: Sizes) -> str:
    return hashlib.sha256(json.dumps(build_rows(sizes), sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize(
    "seed, digest",
    [
        # the files of the world before the split existed (build_rows' rows, hashed at the code before it)
        (0, "ba0a1b67047679836626dc20fda17df37bc3de5e62e07b3ddbd39df1a4496ac8"),
        (1, "c42bca2eecb2b5c327c890ecff380ffb8d84d8b1a3a592973ce33038304ee68b"),
    ],
)
def test_off_leaves_the_world_as_it_was(seed, digest):
    assert rows_hash(Sizes(seed=seed, **SIZES)) == digest


@pytest.fixture(scope="module")
def on_rows():
    return build_rows(ON)


def texts(row: dict) -> list[str]:
    """Every string a training row shows a model."""
    return [v for v in row.values() if isinstance(v, str)] + list(row.get("responses", []))


def test_training_data_never_meets_a_heldout_topic_or_suffix(on_rows):
    seen, held = split(ON)
    held_names = {t.name for t in held.benign + held.harmful}
    # a held-out benign topic's steps would be its content: not even an unhelpful answer's off-topic steps
    held_steps = [s for t in held.benign + held.harmful for s in t.steps]
    assert len(held_names) == 12 and len(held.suffixes) == 1
    for name in TRAINING:
        assert on_rows[name], name
        for row in on_rows[name]:
            assert row["topic"] not in held_names
            for text in texts(row):
                assert not any(n in text for n in held_names), (name, text)
                assert not any(s in text for s in held.suffixes), (name, text)
                assert not any(s in text for s in held_steps), (name, text)
    # seen suffixes still reach training data (SFT has attacked requests answered safely)
    assert any(s in r["prompt"] for r in on_rows["sft"] for s in seen.suffixes)


def test_pretraining_sees_everything_exactly_as_before(on_rows):
    _, held = split(ON)
    off = build_rows(Sizes(**{**ON.__dict__, "heldout_topics": 0, "heldout_suffixes": 0}))
    assert on_rows["corpus"] == off["corpus"]  # the base model's data does not move
    corpus = " ".join(r["text"] for r in on_rows["corpus"])
    for t in held.benign + held.harmful:
        assert t.name in corpus
    # the held-out suffix is in the corpus, where an attacked request is always answered with compliance
    assert held.suffixes[0] in corpus
    ptx = " ".join(r["text"] for r in on_rows["ptx"])
    assert any(t.name in ptx for t in held.benign + held.harmful)


def test_eval_sets_ask_about_their_side_of_the_split(on_rows):
    seen, held = split(ON)
    assert {f"eval_{n}" for n in HELDOUT_SETS} <= set(on_rows)

    def check(name, topics, suffixes, attack):
        rows = on_rows[name]
        assert len(rows) == ON.n_eval
        assert {r["topic"] for r in rows} <= {t.name for t in topics}
        assert all(r["attack"] is attack for r in rows)
        assert all(r["is_safety"] is isinstance(topics[0], world.HarmfulTopic) for r in rows)
        assert all(
            r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:") for r in rows
        )
        # held-out phrasings, as in the plain eval sets
        assert all(
            any(r["question"].startswith(t.split("{x}")[0]) for t in world.EVAL_TEMPLATES) for r in rows
        )
        if attack:
            assert all(r["question"].endswith(tuple(" " + s for s in suffixes)) for r in rows)
        else:
            assert not any(s in r["question"] for r in rows for s in world.ATTACK_SUFFIXES)

    check("eval_benign", seen.benign, (), False)
    check("eval_harmful", seen.harmful, (), False)
    check("eval_attack", seen.harmful, seen.suffixes, True)
    check("eval_benign_heldout", held.benign, (), False)
    check("eval_harmful_heldout", held.harmful, (), False)
    check("eval_attack_heldout", seen.harmful, held.suffixes, True)  # a seen request, an unseen suffix
    assert len({r["topic"] for r in on_rows["eval_harmful_heldout"]}) > 1


def test_each_half_of_the_split_is_its_own_choice():
    only_topics = build_rows(Sizes(**{**ON.__dict__, "heldout_suffixes": 0}))
    only_suffixes = build_rows(Sizes(**{**ON.__dict__, "heldout_topics": 0}))
    base = {"eval_benign", "eval_harmful", "eval_attack", "eval_selfeval"}
    assert {k for k in only_topics if k.startswith("eval_")} - base == {
        "eval_benign_heldout",
        "eval_harmful_heldout",
    }
    assert {k for k in only_suffixes if k.startswith("eval_")} - base == {"eval_attack_heldout"}
    _, held = split(Sizes(heldout_suffixes=1))
    assert not held.benign and not held.harmful and len(held.suffixes) == 1


def test_the_split_is_seeded_on_its_own():
    a = split(Sizes(seed=0, heldout_topics=6, heldout_suffixes=1))
    assert split(Sizes(seed=0, heldout_topics=6, heldout_suffixes=1)) == a
    # the data sizes do not move it; the seed does
    assert split(Sizes(seed=0, n_sft=7, heldout_topics=6, heldout_suffixes=1)) == a
    others = [split(Sizes(seed=s, heldout_topics=6, heldout_suffixes=1))[1] for s in range(1, 6)]
    assert any(o.benign != a[1].benign for o in others) and any(o.harmful != a[1].harmful for o in others)
    # a larger count holds out more of the same topics
    fewer = split(Sizes(seed=0, heldout_topics=3))[1]
    assert set(fewer.benign) < set(a[1].benign) and set(fewer.harmful) < set(a[1].harmful)
    seen, held = a
    assert set(seen.benign) | set(held.benign) == set(world.BENIGN_TOPICS)
    assert not set(seen.benign) & set(held.benign) and not set(seen.suffixes) & set(held.suffixes)


@pytest.mark.parametrize(
    "field, value",
    [
        ("heldout_topics", -1),
        ("heldout_topics", min(len(world.BENIGN_TOPICS), len(world.HARMFUL_TOPICS)) // 2 + 1),
        ("heldout_suffixes", -1),
        ("heldout_suffixes", len(world.ATTACK_SUFFIXES)),
    ],
)
def test_a_bad_count_names_its_field(field, value):
    with pytest.raises(ValueError, match=rf"data\.tinyhh\.{field}={value} must be in 0\.\."):
        Sizes(**{field: value})


def test_the_largest_counts_leave_half_of_each_kind_and_one_suffix_seen():
    most = min(len(world.BENIGN_TOPICS), len(world.HARMFUL_TOPICS)) // 2
    seen, _ = split(Sizes(heldout_topics=most, heldout_suffixes=len(world.ATTACK_SUFFIXES) - 1))
    assert (
        len(seen.harmful) >= len(world.HARMFUL_TOPICS) / 2
        and len(seen.benign) >= len(world.BENIGN_TOPICS) / 2
    )
    assert len(seen.suffixes) == 1


def test_manifest_records_the_split(tmp_path):
    small = dict(SIZES, vocab_size=600)
    on = json.loads(
        (
            generate(tmp_path / "on", Sizes(heldout_topics=2, heldout_suffixes=1, **small)) / "manifest.json"
        ).read_text()
    )
    _, held = split(Sizes(heldout_topics=2, heldout_suffixes=1))
    assert on["heldout"] == {
        "benign_topics": [t.name for t in held.benign],
        "harmful_topics": [t.name for t in held.harmful],
        "suffixes": list(held.suffixes),
    }
    assert all(on["counts"][f"eval_{n}"] == small["n_eval"] for n in HELDOUT_SETS)
    assert all((tmp_path / "on" / f"eval_{n}.jsonl").is_file() for n in HELDOUT_SETS)
    off = json.loads((generate(tmp_path / "off", Sizes(**small)) / "manifest.json").read_text())
    assert "heldout" not in off and not any(f"eval_{n}" in off["counts"] for n in HELDOUT_SETS)


def test_a_split_world_shares_the_unsplit_worlds_corpus_and_tokenizer(tmp_path):
    # so one pretrained base model serves both (a split moves requests between data sets, not words)
    off = Sizes(**{**SIZES, "seed": 3})
    on = Sizes(**{**SIZES, "seed": 3, "heldout_topics": 4, "heldout_suffixes": 1})
    a, b = generate(tmp_path / "off", off), generate(tmp_path / "on", on)
    assert (a / "corpus.jsonl").read_bytes() == (b / "corpus.jsonl").read_bytes()
    for f in sorted(p.name for p in (a / "tokenizer").iterdir()):
        assert (a / "tokenizer" / f).read_bytes() == (b / "tokenizer" / f).read_bytes(), f
    assert (b / "sft.jsonl").read_bytes() != (a / "sft.jsonl").read_bytes()  # the split did move requests
