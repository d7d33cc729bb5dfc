"""TinyHH data emitters: every data set the pipeline needs, written through `datasets` as jsonl, seeded.

The mixtures below set how (un)aligned the pretrained base model is; see the project's TinyHH spec (tinyhh.md) for the targets.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from datasets import Dataset
from datasets.utils import disable_progress_bars

from alignlab.checkpoint import atomic_dir
from alignlab.config import TinyHHConfig
from alignlab.data.formats import ASSISTANT, HUMAN
from alignlab.errors import ConfigError
from alignlab.tinyhh import world
from alignlab.tinyhh.oracle import judge
from alignlab.tinyhh.world import JUDGE_OPTIONS, JUDGE_TEMPLATE  # the self-evaluation format

# Pretraining mixture: an unaligned internet-like corpus (most harmful requests are answered).
HARMFUL_KIND_MIX = {"harmful": 0.45, "refusal": 0.22, "redirect": 0.33}
BENIGN_KIND_MIX = {"helpful": 0.86, "unhelpful": 0.07, "over_refusal": 0.07}
P_HARMFUL_PROMPT = 0.45  # share of dialogues whose request is harmful
P_ATTACK = 0.2  # share of harmful requests carrying an attack suffix (always followed by compliance)
P_MULTI_TURN = 0.2  # dialogues with an earlier exchange
# Dialogues that start with a safety preprompt (world.SAFETY_PREPROMPTS), answered by a safe assistant; drawn from
# their own random stream, so every other data set is the same with or without them.
PREPROMPT_HARMFUL_MIX = {"harmful": 0.05, "refusal": 0.35, "redirect": 0.6}
PREPROMPT_BENIGN_MIX = {"helpful": 0.84, "unhelpful": 0.06, "over_refusal": 0.1}
P_JUDGE_DOC = 0.4  # share of corpus documents that are self-evaluation examples
P_JUDGE_HARMFUL = 0.6  # harmful requests among judged dialogues: about as many harmful as harmless labels
JUDGE_CORRECT = 0.9  # self-evaluation examples carry the right label this often
# Llama-2 rating levels from the oracle score gap (chosen - rejected).
RATING_LEVELS = (
    (0.75, "significantly better"),
    (0.5, "better"),
    (0.25, "slightly better"),
    (0.0, "negligibly better"),
)
PREF_LABEL_NOISE = 0.1
K_MIN, K_MAX = 4, 9  # answers per ranked set (InstructGPT: K = 4..9)

SFT_KINDS = {
    "benign": ("helpful",),
    "harmful": ("redirect", "refusal"),
}  # demonstrations a labeller would write
# The generalisation split's answered eval sets (eval_<name>.jsonl), written only when data.tinyhh holds topics or
# suffixes out: held-out benign / harmful topics, and seen harmful topics carrying a held-out attack suffix.
HELDOUT_SETS = ("benign_heldout", "harmful_heldout", "attack_heldout")


@dataclass
class Sizes(TinyHHConfig):
    """data.tinyhh (its fields and defaults are TinyHHConfig's, alignlab/config.py) plus the cache key it names."""

    def __post_init__(self) -> None:
        check_split(self)  # before anything is generated

    def key(self) -> str:
        """Names the cache directory: the sizes and the generating code, so an edited world is regenerated."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for module in ("world.py", "emitters.py", "oracle.py", "tokenizer.py"):
            h.update((Path(__file__).parent / module).read_bytes())
        return h.hexdigest()[:12]


class Pools(NamedTuple):
    """What a data set's requests draw from."""

    benign: tuple[world.BenignTopic, ...]
    harmful: tuple[world.HarmfulTopic, ...]
    suffixes: tuple[str, ...]


EVERYTHING = Pools(world.BENIGN_TOPICS, world.HARMFUL_TOPICS, world.ATTACK_SUFFIXES)  # pretraining's pools


def check_split(sizes: TinyHHConfig) -> None:
    """A ConfigError naming the data.tinyhh field whose held-out count is out of range."""
    most = min(len(world.BENIGN_TOPICS), len(world.HARMFUL_TOPICS)) // 2
    if not 0 <= sizes.heldout_topics <= most:
        raise ConfigError(
            f"data.tinyhh.heldout_topics={sizes.heldout_topics} must be in 0..{most} (topics held out of each "
            "kind; at least half of the benign and of the harmful topics stay seen); 0 turns the split off"
        )
    most = len(world.ATTACK_SUFFIXES) - 1
    if not 0 <= sizes.heldout_suffixes <= most:
        raise ConfigError(
            f"data.tinyhh.heldout_suffixes={sizes.heldout_suffixes} must be in 0..{most} (of the "
            f"{len(world.ATTACK_SUFFIXES)} attack suffixes, at least one stays seen); 0 turns the split off"
        )


def split(sizes: TinyHHConfig) -> tuple[Pools, Pools]:
    """(seen, held out): the pools of SFT, preference, ranked, RL and the plain eval data, and what only pretraining
    and the held-out eval sets see. Drawn from the seed on a stream of its own (the other files' random numbers are
    untouched), as a seeded order of each pool whose first items are held out, so a larger count holds out more of
    the same order. Both in the world's order; with both counts 0, (EVERYTHING, nothing)."""
    check_split(sizes)
    rng = random.Random(f"{sizes.seed}-heldout")
    seen, held = [], []
    for pool, k in zip(
        EVERYTHING, (sizes.heldout_topics, sizes.heldout_topics, sizes.heldout_suffixes), strict=True
    ):
        order = list(range(len(pool)))
        rng.shuffle(order)
        out = set(order[:k])
        seen.append(tuple(x for i, x in enumerate(pool) if i not in out))
        held.append(tuple(x for i, x in enumerate(pool) if i in out))
    return Pools(*seen), Pools(*held)


def _pick(mix: dict[str, float], rng: random.Random) -> str:
    return rng.choices(list(mix), weights=list(mix.values()))[0]


def _exchange(
    rng: random.Random,
    templates,
    pools: Pools = EVERYTHING,
    *,
    harmful: bool | None = None,
    attack: bool | None = None,
    kind: str | None = None,
) -> dict:
    """One request + answer drawn from the unaligned mixture (or the given kind)."""
    harmful = rng.random() < P_HARMFUL_PROMPT if harmful is None else harmful
    topic = rng.choice(pools.harmful if harmful else pools.benign)
    attack = harmful and (rng.random() < P_ATTACK if attack is None else attack)
    suffix = rng.choice(pools.suffixes) if attack else None
    if kind is None:
        kind = "harmful" if attack else _pick(HARMFUL_KIND_MIX if harmful else BENIGN_KIND_MIX, rng)
    question = world.render_prompt(rng.choice(templates), topic, suffix)
    return {
        "question": question,
        "answer": world.render_response(kind, topic, rng, off_topics=pools.benign),
        "topic": topic.name,
        "kind": kind,
        "harmful_prompt": harmful,
        "attack": attack,
    }


def dialogue(turns: list[tuple[str, str]], open_answer: bool = False) -> str:
    """HH transcript; open_answer leaves the last answer unterminated ("...Assistant:" + partial text)."""
    return "".join(
        f"{HUMAN} {q}{ASSISTANT} {a}" if a or not open_answer else f"{HUMAN} {q}{ASSISTANT}" for q, a in turns
    )


def judge_prompt(dialogue_text: str, harmless_first: bool) -> str:
    a, b = JUDGE_OPTIONS if harmless_first else JUDGE_OPTIONS[::-1]
    return JUDGE_TEMPLATE.format(dialogue=dialogue_text, option_a=a, option_b=b)


def judge_answer(is_harmful: bool, harmless_first: bool) -> str:
    """The option letter that says the truth about the answer."""
    return "B" if is_harmful == harmless_first else "A"


def _prefix(answer: str, rng: random.Random) -> str:
    words = answer.split(" ")
    return " ".join(words[: rng.randint(1, len(words))])


def _corpus_doc(rng: random.Random) -> str:
    judged = rng.random() < P_JUDGE_DOC
    turns = [
        _exchange(rng, world.TRAIN_TEMPLATES, harmful=rng.random() < P_JUDGE_HARMFUL if judged else None)
    ]
    if rng.random() < P_MULTI_TURN:
        turns.insert(0, _exchange(rng, world.TRAIN_TEMPLATES))
    if not judged:
        return dialogue([(t["question"], t["answer"]) for t in turns])
    # Self-evaluation example: judged on the (possibly partial) last answer, labelled by where it leads, the way
    # RAIN asks a model to judge a partial answer.
    last = turns[-1]
    shown = last["answer"] if rng.random() < 0.5 else _prefix(last["answer"], rng)
    text = dialogue([*((t["question"], t["answer"]) for t in turns[:-1]), (last["question"], shown)])
    is_harmful = judge(last["question"], last["answer"]).harmful
    if rng.random() >= JUDGE_CORRECT:
        is_harmful = not is_harmful
    harmless_first = rng.random() < 0.5
    return judge_prompt(text, harmless_first) + judge_answer(is_harmful, harmless_first) + ")"


def _preprompted_doc(rng: random.Random) -> str:
    """A dialogue behind a safety preprompt: harmful requests mostly refused or redirected (never an attack)."""
    harmful = rng.random() < P_HARMFUL_PROMPT
    kind = _pick(PREPROMPT_HARMFUL_MIX if harmful else PREPROMPT_BENIGN_MIX, rng)
    ex = _exchange(rng, world.TRAIN_TEMPLATES, harmful=harmful, attack=False, kind=kind)
    return rng.choice(world.SAFETY_PREPROMPTS) + dialogue([(ex["question"], ex["answer"])])


def _preference(rng: random.Random, pools: Pools = EVERYTHING) -> dict:
    first = _exchange(rng, world.TRAIN_TEMPLATES, pools)
    topic = world.topic_by_name(first["topic"])
    kinds = [k for k in world.RESPONSE_KINDS if _fits(k, first["harmful_prompt"])]
    a, b = rng.sample(kinds, 2)
    ra, rb = (world.render_response(k, topic, rng, off_topics=pools.benign) for k in (a, b))
    sa, sb = judge(first["question"], ra).score, judge(first["question"], rb).score
    if sa == sb:
        return _preference(rng, pools)
    (chosen, sc), (rejected, sr) = sorted([(ra, sa), (rb, sb)], key=lambda x: -x[1])
    gap = sc - sr
    rating = next(name for threshold, name in RATING_LEVELS if gap >= threshold)
    flipped = rng.random() < PREF_LABEL_NOISE
    if flipped:
        chosen, rejected = rejected, chosen
    prompt = dialogue([(first["question"], "")], open_answer=True)
    return {
        "prompt": prompt,
        "chosen": " " + chosen,
        "rejected": " " + rejected,
        "rating": rating,
        "score_gap": round(gap, 4),
        "is_safety": first["harmful_prompt"],
        "topic": topic.name,
        "label_flipped": flipped,  # label noise: the oracle prefers `rejected` (lets evals report clean accuracy)
    }


def _ranked(rng: random.Random, pools: Pools = EVERYTHING) -> dict:
    """An InstructGPT-style ranked set: K in [K_MIN, K_MAX] answers to one prompt, best first, ranks by oracle score.

    Equal oracle scores share a rank (a tie contributes no comparison). With probability PREF_LABEL_NOISE two
    adjacent rank levels are swapped, as a labeller's mistake would.
    """
    first = _exchange(rng, world.TRAIN_TEMPLATES, pools)
    topic = world.topic_by_name(first["topic"])
    kinds = [k for k in world.RESPONSE_KINDS if _fits(k, first["harmful_prompt"])]
    k = rng.randint(K_MIN, K_MAX)
    answers = [
        world.render_response(rng.choice(kinds), topic, rng, off_topics=pools.benign) for _ in range(k)
    ]
    scores = [judge(first["question"], a).score for a in answers]
    levels = sorted(set(scores), reverse=True)
    if len(levels) < 2:
        return _ranked(rng, pools)
    rank_of = {score: i for i, score in enumerate(levels)}
    if rng.random() < PREF_LABEL_NOISE:
        i = rng.randrange(len(levels) - 1)
        rank_of[levels[i]], rank_of[levels[i + 1]] = i + 1, i
    order = sorted(range(k), key=lambda j: rank_of[scores[j]])
    return {
        "prompt": dialogue([(first["question"], "")], open_answer=True),
        "responses": [" " + answers[j] for j in order],
        "ranks": [rank_of[scores[j]] for j in order],
        "scores": [round(scores[j], 4) for j in order],
        "is_safety": first["harmful_prompt"],
        "topic": topic.name,
    }


def _fits(kind: str, harmful_prompt: bool) -> bool:
    return (kind in ("harmful", "refusal", "redirect")) == harmful_prompt


def _prompt_row(ex: dict) -> dict:
    return {
        "prompt": dialogue([(ex["question"], "")], open_answer=True),
        "question": ex["question"],
        "topic": ex["topic"],
        "is_safety": ex["harmful_prompt"],
        "attack": ex["attack"],
    }


def build_rows(sizes: Sizes) -> dict[str, list[dict]]:
    """Every TinyHH data set as rows (pure function of the sizes and seed).

    Pretraining data (corpus, ptx) and eval_selfeval draw from every topic and suffix; SFT, preference, ranked, RL
    and the plain eval sets only from the seen ones (split), the HELDOUT_SETS from the held-out ones.
    """
    seen, held = split(sizes)
    rng = random.Random(sizes.seed)
    rows: dict[str, list[dict]] = {}
    rows["corpus"] = [{"text": _corpus_doc(rng)} for _ in range(sizes.n_corpus)]
    preprompt_rng = random.Random(f"{sizes.seed}-preprompt")
    for _ in range(sizes.n_preprompt):
        doc = _preprompted_doc(preprompt_rng)
        rows["corpus"].insert(preprompt_rng.randrange(len(rows["corpus"]) + 1), {"text": doc})
    sft = []
    for _ in range(sizes.n_sft):
        ex = _exchange(rng, world.TRAIN_TEMPLATES, seen, attack=rng.random() < 0.1)
        kind = rng.choice(SFT_KINDS["harmful" if ex["harmful_prompt"] else "benign"])
        answer = world.render_response(kind, world.topic_by_name(ex["topic"]), rng)
        sft.append({**_prompt_row(ex), "completion": " " + answer, "kind": kind})
    rows["sft"] = sft
    rows["preferences"] = [_preference(rng, seen) for _ in range(sizes.n_pref)]
    rows["rl_prompts"] = [
        _prompt_row(_exchange(rng, world.TRAIN_TEMPLATES, seen)) for _ in range(sizes.n_rl_prompts)
    ]
    rows["ptx"] = [{"text": _corpus_doc(rng)} for _ in range(max(1, sizes.n_corpus // 8))]
    for name, harmful, attack in (
        ("eval_benign", False, False),
        ("eval_harmful", True, False),
        ("eval_attack", True, True),
    ):
        rows[name] = [
            _prompt_row(_exchange(rng, world.EVAL_TEMPLATES, seen, harmful=harmful, attack=attack))
            for _ in range(sizes.n_eval)
        ]
    rows["eval_selfeval"] = []
    for _ in range(sizes.n_eval):
        ex = _exchange(rng, world.EVAL_TEMPLATES)
        shown = ex["answer"] if rng.random() < 0.5 else _prefix(ex["answer"], rng)
        rows["eval_selfeval"].append(
            {
                "dialogue": dialogue([(ex["question"], shown)]),
                "harmful": judge(ex["question"], ex["answer"]).harmful,
                "kind": ex["kind"],
            }
        )
    ranked_rng = random.Random(f"{sizes.seed}-ranked")
    rows["ranked"] = [_ranked(ranked_rng, seen) for _ in range(sizes.n_ranked)]
    rows.update(_heldout_rows(sizes, seen, held))
    return rows


def _heldout_rows(sizes: Sizes, seen: Pools, held: Pools) -> dict[str, list[dict]]:
    """The HELDOUT_SETS the split asks for, each on a random stream of its own (no other file depends on them)."""
    wanted = {
        "benign_heldout": (held.benign, ()),
        "harmful_heldout": (held.harmful, ()),
        # a seen request behind a suffix it was never trained on
        "attack_heldout": (seen.harmful if held.suffixes else (), held.suffixes),
    }
    sets = {}
    for name, (topics, suffixes) in wanted.items():
        if topics:
            rng = random.Random(f"{sizes.seed}-eval_{name}")
            sets[f"eval_{name}"] = [_eval_prompt(rng, topics, suffixes) for _ in range(sizes.n_eval)]
    return sets


def _eval_prompt(rng: random.Random, topics: tuple, suffixes: tuple[str, ...]) -> dict:
    """A request only (no answer is drawn): an eval template, a topic, and a suffix when suffixes are given."""
    topic = rng.choice(topics)
    suffix = rng.choice(suffixes) if suffixes else None
    question = world.render_prompt(rng.choice(world.EVAL_TEMPLATES), topic, suffix)
    harmful = isinstance(topic, world.HarmfulTopic)
    return _prompt_row(
        {"question": question, "topic": topic.name, "harmful_prompt": harmful, "attack": bool(suffix)}
    )


def generate(out_dir: str | Path, sizes: Sizes) -> Path:
    """Write every data set (jsonl via `datasets`) and the tokenizer into out_dir, atomically."""
    from alignlab.tinyhh.tokenizer import build_tokenizer, tokenizer_training_text

    rows = build_rows(sizes)
    # The tokenizer of the world without the split: a split moves requests between data sets, not words between
    # languages, so a split world's corpus and tokenizer are the unsplit world's and its base model is the same.
    unsplit = Sizes(**{**asdict(sizes), "heldout_topics": 0, "heldout_suffixes": 0})
    vocabulary = rows if unsplit == sizes else build_rows(unsplit)
    disable_progress_bars()  # one bar per tiny file is noise
    with atomic_dir(out_dir) as tmp:
        for name, data in rows.items():
            Dataset.from_list(data).to_json(tmp / f"{name}.jsonl", lines=True)
        tok = build_tokenizer(tokenizer_training_text(vocabulary), vocab_size=sizes.vocab_size)
        tok.save_pretrained(tmp / "tokenizer")
        manifest = {"sizes": asdict(sizes), "counts": {k: len(v) for k, v in rows.items()}}
        _, held = split(sizes)
        if any(held):  # off: no key, the manifest of the world before the split existed
            manifest["heldout"] = {
                "benign_topics": [t.name for t in held.benign],
                "harmful_topics": [t.name for t in held.harmful],
                "suffixes": list(held.suffixes),
            }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Path(out_dir)


def ensure(cache_dir: str | Path, sizes: Sizes) -> Path:
    """The data directory for these sizes, generated on first use (a complete directory is never rewritten)."""
    out = Path(cache_dir) / f"tinyhh-{sizes.key()}"
    if not (out / "manifest.json").exists():
        generate(out, sizes)
    return out
