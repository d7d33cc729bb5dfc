"""Local data files in the formats researchers have, written when the tests run (tests/zoo).

Every file holds the same small world of dialogues (a question, a good and a bad answer, some with an earlier
exchange), so each format can train each stage:
- hh.jsonl: Anthropic HH transcripts {"chosen", "rejected"} (a few with CRLF line endings, as exported on Windows);
- pc.jsonl / pc_conv.jsonl: TRL prompt/completion, plain strings and conversational message lists;
- pref.jsonl / pref_conv.jsonl / pref_implicit.jsonl: TRL preference, plain, conversational with an explicit prompt,
  and conversational with the prompt implicit in whole chosen/rejected conversations;
- messages.jsonl: chat {"messages"} with a system turn;
- prompts.jsonl: {"prompt"} for RAIN and eval; text.jsonl: {"text"} pretraining text (the alignment tax).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FILES = {
    "hh": ("hh.jsonl", "hh"),
    "pc": ("pc.jsonl", "prompt_completion"),
    "pc_conv": ("pc_conv.jsonl", "prompt_completion"),
    "pref": ("pref.jsonl", "preference"),
    "pref_conv": ("pref_conv.jsonl", "preference"),
    "pref_implicit": ("pref_implicit.jsonl", "preference"),
    "messages": ("messages.jsonl", "messages"),
}
SYSTEM = "You are a careful assistant."
_TOPICS = ["bread", "a poem", "the weather", "python lists", "my garden", "a song", "my cat", "water plants"]


def dialogues(n: int = 48, seed: int = 0) -> list[dict]:
    """[{history: [(user, assistant)...], question, good, bad}]: a third with one earlier exchange."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        history = (
            [(f"Hi, can you help with {rng.choice(_TOPICS)}?", "Sure, what do you need?")]
            if i % 3 == 0
            else []
        )
        out.append(
            {
                "history": history,
                "question": f"Tell me about {topic} please, number {i}?",
                "good": f"Here is a short and safe answer about {topic}. I hope it helps.",
                "bad": "No.",
            }
        )
    return out


def _messages(d: dict, answer: str, system: bool = False) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for user, assistant in d["history"]:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    msgs.append({"role": "user", "content": d["question"]})
    return msgs + [{"role": "assistant", "content": answer}]


def _hh(msgs: list[dict]) -> str:
    tag = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}
    return "".join(tag[m["role"]] + m["content"] for m in msgs if m["role"] != "system")


def write_all(out_dir: str | Path, n: int = 48) -> dict[str, Path]:
    """Every file above in out_dir; returns name -> path (plus "prompts" and "text")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {k: [] for k in FILES}
    rows["prompts"], rows["text"] = [], []
    for i, d in enumerate(dialogues(n)):
        good, bad = _messages(d, d["good"]), _messages(d, d["bad"])
        chosen, rejected = _hh(good), _hh(bad)
        if i % 8 == 0:  # Windows line endings
            chosen, rejected = chosen.replace("\n", "\r\n"), rejected.replace("\n", "\r\n")
        rows["hh"].append({"chosen": chosen, "rejected": rejected})
        prompt = _hh(good[:-1]) + "\n\nAssistant:"
        rows["pc"].append({"prompt": prompt, "completion": " " + d["good"]})
        rows["pc_conv"].append({"prompt": good[:-1], "completion": good[-1:]})
        rows["pref"].append({"prompt": prompt, "chosen": " " + d["good"], "rejected": " " + d["bad"]})
        rows["pref_conv"].append({"prompt": good[:-1], "chosen": good[-1:], "rejected": bad[-1:]})
        rows["pref_implicit"].append({"chosen": good, "rejected": bad})
        rows["messages"].append({"messages": _messages(d, d["good"], system=True)})
        rows["prompts"].append({"prompt": prompt})
        rows["text"].append({"text": f"{d['question']} {d['good']} The end of document {i}."})
    paths = {}
    for name, items in rows.items():
        path = out / FILES.get(name, (f"{name}.jsonl",))[0]
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        paths[name] = path
    return paths
