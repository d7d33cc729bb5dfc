"""Plain text for language modelling: a text column loaded through `datasets`, documents packed into blocks, and
the pretraining text (ptx) that PPO-ptx mixes into training and the alignment tax is measured on.

Used by stage=pretrain (its corpus and training stream), stage=ppo / ppo_ptx (ptx blocks, their training stream and
held-out part) and stage=eval (the same held-out part, tokenized with each evaluated model's own tokenizer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from alignlab.data.formats import canonicalize
from alignlab.data.loading import load_rows
from alignlab.data.packing import EpochOrder, Packed, lm_labels, micro_batch_positions, pack_documents

log = logging.getLogger("alignlab.data")

# The held-out part of the ptx text is its first 1/PTX_HELD_OUT_DIVISOR (at least one document).
PTX_HELD_OUT_DIVISOR = 10


def load_texts(source: str, fmt: str, split: str, *, on_malformed: str, max_rows: int | None) -> list[str]:
    """The documents of `source` (hub name or local file) in data format `fmt`, rendered as plain text.

    Malformed rows follow `on_malformed` (error, or skip and count); skipped rows are logged, never dropped silently.
    """
    ds = load_rows(source, split)
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    ds, skipped = canonicalize(ds, fmt, "text", source=source, on_malformed=on_malformed)
    if skipped.total:
        log.warning("%s: %s", source, skipped.summary())
    return ds.to_dict()["text"]  # a list (ds["text"] is a lazy Column: ~0.2 ms per row read one at a time)


def pack_texts(texts: list[str], tokenizer, seq_len: int) -> Packed:
    """BOS (the tokenizer's own) + text + EOS per document, packed whole into blocks of seq_len tokens."""
    docs = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, verbose=False)["input_ids"]]
    return pack_documents(docs, seq_len, tokenizer.pad_token_id)


class PtxTexts(NamedTuple):
    """The pretraining text of PPO-ptx and the alignment tax, split once for every stage that reads it."""

    train: list[str]  # what PPO-ptx trains on
    held_out: list[str]  # never trained on: PPO's eval/ptx_loss and stage=eval's ptx_loss are measured on it
    source: str  # where the text came from (a hub name or a file)


def load_ptx_texts(ptx_source: str | None, data_dir: Path | None, *, on_malformed: str) -> PtxTexts | None:
    """stage.ptx_source's `text` column (hub name or local file), else TinyHH's ptx.jsonl in data_dir; None where
    there is neither. The held-out part is the first tenth (at least one document), in file order, so that every
    stage agrees on it without sharing a seed.

    on_malformed applies to the user's ptx_source; TinyHH's generated file must be clean (errors are raised).
    """
    if ptx_source:
        source = ptx_source
        texts = load_texts(source, "text", "train", on_malformed=on_malformed, max_rows=None)
    elif data_dir is not None:
        source = str(data_dir / "ptx.jsonl")
        texts = load_texts(source, "text", "train", on_malformed="error", max_rows=None)
    else:
        return None
    n_held_out = max(1, len(texts) // PTX_HELD_OUT_DIVISOR)
    return PtxTexts(train=texts[n_held_out:], held_out=texts[:n_held_out], source=source)


class LMBatch(NamedTuple):
    """A causal-LM micro-batch of packed blocks."""

    tokens: torch.Tensor  # [b, L] token ids
    labels: torch.Tensor  # [b, L] the tokens, -100 on padding (so every EOS keeps its label)


@dataclass
class BlockStream:
    """An endless stream of micro-batches over packed blocks: optimizer step k (from 0) reads the k-th global batch
    of a seeded per-epoch order of the blocks; micro-batch m of rank r reads its own slice of it, so one process
    with accumulation and N processes read the same data in the same order (and a resumed run reads on)."""

    blocks: Packed
    order: EpochOrder
    micro_batch_size: int
    batch_size: int  # global: micro_batch_size x accumulation steps x ranks

    def batch(self, step: int, micro: int, rank: int, world: int, device) -> LMBatch:
        """Micro-batch `micro` of `rank` at optimizer step `step` (from 0), on device."""
        positions = micro_batch_positions(step, micro, rank, world, self.micro_batch_size, self.batch_size)
        part = self.blocks.subset(self.order(positions))
        x = part.tokens.to(device)
        return LMBatch(x, lm_labels(x, part.lengths))
