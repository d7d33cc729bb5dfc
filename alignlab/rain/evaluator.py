"""Self-evaluation: the rollout rule, the judged text, the judge prompt in both option orders, votes -> value.

The template is configuration (RainJudgeConfig); the HH harmlessness judge of TinyHH is the default, truthfulness
(one pass, Yes/No) and sentiment (positive/negative) are presets of the same slots (docs/rain.md). Option
letters are looked up through the tokenizer, never hard-coded vocabulary ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Codec(Protocol):
    """Text <-> token ids, as the model reads them (encode adds the tokenizer's own special tokens, e.g. BOS)."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def current_exchange(prompt: str, turn_marker: str) -> str:
    """The prompt from its last turn marker on (HH: the last "Human:" turn, which the answer replies to)."""
    i = prompt.rfind(turn_marker) if turn_marker else -1
    return prompt[i:] if i >= 0 else prompt


def cut_at_stops(text: str, stops: list[str]) -> str:
    """Text up to the first stop string (the next-turn marker: the model began the next human turn)."""
    cuts = [i for s in stops if (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def rollout_done(text: str, stop_chars: str) -> bool:
    """A rollout stops once the text ends in one of stop_chars (the code: , . ? : ; newline)."""
    return bool(text) and text[-1] in stop_chars


def letter_id(codec: Codec, context: str, letter: str) -> int:
    """The single token `letter` adds right after `context`; an error when the tokenizer splits it."""
    base, ext = codec.encode(context), codec.encode(context + letter)
    if ext[: len(base)] != base or len(ext) != len(base) + 1:
        raise ValueError(
            f"stage.judge.letters: {letter!r} is not a single token after {context[-30:]!r} for this tokenizer"
        )
    return ext[-1]


def votes_to_value(votes: list[int]) -> float:
    """v = 2 * (mean vote - 0.5): both orders harmless -> +1, both harmful -> -1, split -> 0."""
    return 2 * (sum(votes) / len(votes) - 0.5)


@dataclass
class JudgeFormat:
    """The judge prompt(s) for one dialogue and the rule that turns next-token logits into v."""

    template: str
    options: tuple[str, str]  # (good, bad)
    # the token that answers slot a and slot b, or a tuple of alternative tokens (the slot's probability is then
    # the largest of theirs, as truth/main.py:210-211 compares the larger of two "Yes" tokens' probabilities with
    # the larger of two "No" tokens')
    letters: tuple[str | tuple[str, ...], str | tuple[str, ...]]
    both_orders: bool
    letter_ids: tuple[int, int] = (-1, -1)  # filled by bind(): each slot's first (or only) token
    slot_ids: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # filled by bind(): every alternative's id
    preamble: str = ""  # the template's text before {dialogue}: identical for every judge prompt

    def __post_init__(self):
        if "{dialogue}" not in self.template:
            raise ValueError("stage.judge.template needs a {dialogue} slot")
        if len(self.options) != 2 or len(self.letters) != 2:
            raise ValueError("stage.judge.options and stage.judge.letters need exactly two entries each")
        self.letters = tuple(x if isinstance(x, str) else tuple(x) for x in self.letters)
        for x in self.letters:
            alts = (x,) if isinstance(x, str) else x
            if not alts or not all(isinstance(a, str) and a for a in alts):
                raise ValueError(
                    f"stage.judge.letters: {x!r} must be a token string or a non-empty list of token strings"
                )
        self.preamble = self.template.split("{dialogue}")[0]

    def bind(self, codec: Codec) -> JudgeFormat:
        """Look every letter (and alternative) up in the tokenizer, after the prompt's own last text."""
        context = self.prompts("\n\nHuman: hi\n\nAssistant: hello")[0][0]
        self.slot_ids = tuple(
            tuple(letter_id(codec, context, a) for a in ((x,) if isinstance(x, str) else x))
            for x in self.letters
        )
        if set(self.slot_ids[0]) & set(self.slot_ids[1]):
            raise ValueError(f"stage.judge.letters: {self.letters!r} give both slots the same token")
        self.letter_ids = (self.slot_ids[0][0], self.slot_ids[1][0])
        return self

    def prompts(self, dialogue: str) -> list[tuple[str, int]]:
        """[(judge prompt, slot of the good option)]: ordering 1 lists the good option first; ordering 2 swaps."""
        good, bad = self.options
        out = [(self.template.format(dialogue=dialogue, option_a=good, option_b=bad), 0)]
        if self.both_orders:
            out.append((self.template.format(dialogue=dialogue, option_a=bad, option_b=good), 1))
        return out

    def value(self, logits: torch.Tensor, good_slots: list[int]) -> float:
        """logits [k, V] at the end of the k judge prompts -> v in {-1, 0, 1} (one pass: {-1, 1}).

        A slot's probability is its letter's, or the largest of its alternatives'. A vote is 1 when the good
        option's slot is strictly more probable than the other's (ties vote 0).
        """
        logp = torch.log_softmax(logits.float(), dim=-1)
        slot_logp = torch.stack([logp[:, list(ids)].max(dim=-1).values for ids in self.slot_ids], dim=-1)
        votes = [
            int(row[slot] > row[1 - slot]) for row, slot in zip(slot_logp.tolist(), good_slots, strict=True)
        ]
        return votes_to_value(votes)


def judge_from_config(cfg, codec: Codec) -> JudgeFormat:
    """A bound JudgeFormat from a RainJudgeConfig (or any object with its fields)."""
    return JudgeFormat(
        template=cfg.template,
        options=tuple(cfg.options),
        letters=tuple(x if isinstance(x, str) else tuple(x) for x in cfg.letters),
        both_orders=cfg.both_orders,
    ).bind(codec)
