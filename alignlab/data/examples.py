"""Tokenized training examples with their loss masks: SFT (answer tokens only) and reward-model sequences.

A conversation is rendered in the model's own format (alignlab/data/chat.py: its chat template, or the HH
transcript) and the whole text is tokenized at once, so the ids of prompt + answer are the tokenizer's ids of the
joined text: a SentencePiece tokenizer gets no extra "▁" where the answer starts. Where each piece's tokens begin
is read off the tokenization of the text up to that piece (a token straddling the boundary belongs to the answer).
The EOS ending an answer (a chat template's end-of-turn token) is appended by id and carries a label, so an answer
is learnt to stop even where pad == eos (masks are by position, never by id).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignlab.data import chat

TRAIN_ON = ("last_turn", "all_assistant_turns")


def check_train_on(train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise ValueError(f"stage.train_on={train_on!r}; choose one of {', '.join(TRAIN_ON)}")


def sft_segments(
    prompt: str, completion: str, train_on: str = "last_turn", tokenizer=None
) -> list[tuple[str, bool]]:
    """(text, trained) pieces of the rendered prompt + completion, in order (tokenizer None: the HH transcript).

    last_turn: only the completion trains (Llama 2 masks the prompt and every earlier turn).
    all_assistant_turns: an HH prompt's earlier assistant answers train too; the human turns and the role tags
    ("\\n\\nAssistant:", a template's headers) never do. A prompt that is not an HH transcript is one masked piece.
    """
    check_train_on(train_on)
    return chat.segments(tokenizer, prompt, completion, train_on == "all_assistant_turns")


def encode(tokenizer, text: str) -> list[int]:
    """The tokenizer's ids of text as a model reads it from the start: its BOS (unless the rendered text already
    begins with it, as Llama 2's chat template does), never a trailing EOS (ours goes after the answer)."""
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and not text.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]  # tokenizers that also append EOS
    return ids


def encode_pieces(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(ids, mask) of the joined pieces: ids = encode(joined text); mask 1 on the tokens of trained pieces."""
    text = "".join(t for t, _ in pieces)
    ids = encode(tokenizer, text)
    mask = [0] * len(ids)
    start, end_char = 0, 0
    for i, (piece, trained) in enumerate(pieces):
        end_char += len(piece)
        end = (
            len(ids)
            if i == len(pieces) - 1
            else max(start, _common_prefix(encode(tokenizer, text[:end_char]), ids))
        )
        mask[start:end] = [int(trained)] * (end - start)
        start = end
    return ids, mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def sft_example(tokenizer, prompt: str, completion: str, train_on: str = "last_turn") -> dict[str, list[int]]:
    """{"input_ids", "completion_mask"}: mask 1 on trained tokens (answers and the final EOS), 0 elsewhere.

    TRL's SFTTrainer(completion_only_loss=True) turns completion_mask == 0 into label -100.
    """
    ids, mask = encode_pieces(tokenizer, sft_segments(prompt, completion, train_on, tokenizer))
    return {"input_ids": ids + [chat.format_of(tokenizer).eos_id], "completion_mask": mask + [1]}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids as every stage feeds it to the model (rendered, BOS where the tokenizer uses one, no EOS)."""
    return encode(tokenizer, chat.render_prompt(tokenizer, prompt))


def sequence_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """prompt + response + EOS token ids: what a reward model scores (its score is read at the final EOS)."""
    text = chat.render_prompt(tokenizer, prompt) + chat.render_answer(tokenizer, prompt, response)
    return encode(tokenizer, text) + [chat.format_of(tokenizer).eos_id]


def decode_answer(tokenizer, ids: list[int]) -> str:
    """The text that ids add after a prompt (special tokens dropped). Decoded behind an anchor token, so a
    SentencePiece decoder keeps the answer's leading space (decoding the answer alone strips it)."""
    anchor = getattr(tokenizer, "_alignlab_anchor", None)
    if anchor is None:
        anchor = tokenizer._alignlab_anchor = encode(tokenizer, "a")[-1:]
    if not anchor:
        return tokenizer.decode(ids, skip_special_tokens=True)
    head = tokenizer.decode(anchor, skip_special_tokens=True)
    both = tokenizer.decode(anchor + list(ids), skip_special_tokens=True)
    return both[len(head) :] if both.startswith(head) else tokenizer.decode(ids, skip_special_tokens=True)


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
            f"tokens (longest {self.longest}; first rows of the source, 0-based: {self.examples}) and were "
            f"{action}; raise stage.max_length "
            "to keep them"
        )
