"""A scripted deterministic stub LM for RAIN tests: character tokens, logits a pure function of the token
sequence (so batched, cached and plain computations agree exactly), a judge that calls an answer harmful when
it contains "x", and embeddings that make siblings look alike (so similarity updates and dynamic addition fire).
"""

from __future__ import annotations

import string
import zlib

import torch

from alignlab.rain.evaluator import JudgeFormat

CHARS = string.ascii_letters + " .,?:;!|/=\n"
PAD, BOS, EOS = 0, 1, 2
VOCAB = 3 + len(CHARS)
TEMPLATE = "Judge:{dialogue}|{option_a}/{option_b}="


class CharCodec:
    eos_id = EOS
    pad_id = PAD

    def encode(self, text: str) -> list[int]:
        return [BOS] + [3 + CHARS.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(CHARS[i - 3] for i in ids if i >= 3)


CODEC = CharCodec()


def stub_logits(ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Next-token logits [VOCAB] after ids: seeded by the last three tokens and the length; the judge prompt's
    letters follow the "x" rule, with a deterministic 15% of flipped votes."""
    ids = tuple(ids)
    text = CODEC.decode(list(ids))
    g = torch.Generator().manual_seed(zlib.crc32(repr((ids[-3:], len(ids))).encode()))
    logits = 1.5 * torch.randn(VOCAB, generator=g)
    if text.endswith("=") and text.startswith("Judge:"):
        dialogue, options = text[len("Judge:") :].rsplit("|", 1)
        harmless_first = options.startswith("safe")
        harmful = "x" in dialogue.split("Human:")[-1].split("Assistant:")[-1]
        truth_a = harmless_first != harmful  # slot a says the truth
        flip = zlib.crc32(text.encode()) % 100 < 15
        a, b = 3 + CHARS.index("a"), 3 + CHARS.index("b")
        logits[a], logits[b] = (3.0, 0.0) if truth_a != flip else (0.0, 3.0)
        return logits
    # Harmful content ("x") is common, and nearly everywhere after a request to steal: there every child of a
    # node can look bad, which is when dynamic addition fires.
    logits[3 + CHARS.index("x")] += 4.0 if "steal" in text else 1.2
    logits[3 + CHARS.index(".")] += 0.8  # rollouts end soon
    logits[EOS] -= 1.0
    return logits.float()


def stub_embed(text: str) -> torch.Tensor:
    """Mostly one direction: siblings are near-duplicates (cos >= 0.95) unless their "x" counts differ."""
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    v = torch.tensor([1.0, 0.05 * text.count("x"), 0.005 * len(text), 0.0]) + 0.01 * torch.randn(
        4, generator=g
    )
    return v / v.norm()


def stub_judge() -> JudgeFormat:
    return JudgeFormat(template=TEMPLATE, options=("safe", "bad"), letters=("a", "b"), both_orders=True).bind(
        CODEC
    )


class StubBackend:
    """Segments are token tuples; a row's logits are logits_fn (stub_logits) of its whole state. Counts rows and
    calls."""

    def __init__(self, logits_fn=None):
        self.calls = self.rows = 0
        self.logits_fn = logits_fn or stub_logits

    def extend(self, rows, want_cache=True):
        self.calls += 1
        self.rows += len(rows)
        segs, logits = [], []
        for prefix, toks in rows:
            state = tuple(t for seg in prefix for t in seg) + tuple(toks)
            segs.append(tuple(toks))
            logits.append(self.logits_fn(state))
        return (segs if want_cache else None), torch.stack(logits)


def embed_many(texts: list[str]) -> torch.Tensor:
    return torch.stack([stub_embed(t) for t in texts])
