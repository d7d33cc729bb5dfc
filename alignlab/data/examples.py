"""Tokenized training examples with their loss masks: SFT (answer tokens only) and reward-model sequences.

Every piece is tokenized on its own and concatenated, exactly as generation later sees a prompt followed by the
tokens the model produced. The EOS ending an answer is appended by id and carries a label, so an answer is
learnt to stop even where pad == eos (masks are by position, never by id).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignlab.data.formats import ASSISTANT, FormatProblem, parse_hh, render_hh

TRAIN_ON = ("last_turn", "all_assistant_turns")


def sft_segments(prompt: str, completion: str, train_on: str = "last_turn") -> list[tuple[str, bool]]:
    """(text, trained) pieces of prompt + completion, in order.

    last_turn: only the completion trains (Llama 2 masks the prompt and every earlier turn).
    all_assistant_turns: an HH prompt's earlier assistant answers train too; the human turns and the
    "\\n\\nAssistant:" tags never do. A prompt that is not an HH transcript is one masked piece.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"stage.train_on={train_on!r}; choose one of {', '.join(TRAIN_ON)}")
    if train_on == "last_turn" or not prompt.endswith(ASSISTANT):
        return [(prompt, False), (completion, True)]
    try:
        turns = parse_hh(prompt[: -len(ASSISTANT)] + ASSISTANT + " x")[
            :-1
        ]  # the open last turn parses as "x"
    except FormatProblem:
        return [(prompt, False), (completion, True)]
    pieces: list[tuple[str, bool]] = []
    for role, content in turns:
        if role == "assistant":
            pieces.append((ASSISTANT, False))
            pieces.append((content, True))
        else:
            pieces.append((render_hh([(role, content)]), False))
    pieces.append((ASSISTANT, False))
    pieces.append((completion, True))
    return [(text, trained) for text, trained in pieces if text]


def _ids(tokenizer, text: str, first: bool) -> list[int]:
    # Only the first piece gets the tokenizer's special tokens (BOS for Llama-style tokenizers).
    ids = tokenizer(text, add_special_tokens=first)["input_ids"]
    if first and tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]  # tokenizers that also append EOS: ours goes after the answer, not the prompt
    return ids


def sft_example(tokenizer, prompt: str, completion: str, train_on: str = "last_turn") -> dict[str, list[int]]:
    """{"input_ids", "completion_mask"}: mask 1 on trained tokens (answers and the final EOS), 0 elsewhere.

    TRL's SFTTrainer(completion_only_loss=True) turns completion_mask == 0 into label -100.
    """
    input_ids: list[int] = []
    mask: list[int] = []
    for i, (text, trained) in enumerate(sft_segments(prompt, completion, train_on)):
        ids = _ids(tokenizer, text, first=i == 0)
        input_ids += ids
        mask += [int(trained)] * len(ids)
    input_ids.append(tokenizer.eos_token_id)
    mask.append(1)
    return {"input_ids": input_ids, "completion_mask": mask}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids as every stage feeds it to the model (BOS where the tokenizer uses one, no EOS)."""
    return _ids(tokenizer, prompt, first=True)


def sequence_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """prompt + response + EOS token ids: what a reward model scores (its score is read at the final EOS)."""
    return (
        _ids(tokenizer, prompt, first=True)
        + _ids(tokenizer, response, first=False)
        + [tokenizer.eos_token_id]
    )


@dataclass
class LengthReport:
    """Rows longer than max_length: counted, logged, and either truncated (SFT) or dropped (RM), never silently."""

    max_length: int
    rows: int = 0
    too_long: int = 0
    longest: int = 0
    examples: list[int] = field(default_factory=list)  # first few 0-based row indices

    def add(self, row: int, length: int) -> bool:
        """Count one row; True when it is longer than max_length."""
        self.rows += 1
        self.longest = max(self.longest, length)
        if length <= self.max_length:
            return False
        self.too_long += 1
        if len(self.examples) < 5:
            self.examples.append(row)
        return True

    def summary(self, source: str, action: str) -> str:
        return (
            f"{source}: {self.too_long} of {self.rows} rows are longer than stage.max_length={self.max_length} "
            f"tokens (longest {self.longest}; rows {self.examples}...) and were {action}; raise stage.max_length "
            "to keep them"
        )
