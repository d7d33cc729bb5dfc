"""Packing whole documents into fixed-length blocks, their LM labels, and a seeded data order that any world
size reads identically."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    tokens: torch.Tensor  # [n_blocks, seq_len] token ids, right-padded with pad_id
    lengths: torch.Tensor  # [n_blocks] real tokens per block; positions >= length are padding
    truncated: int  # documents longer than seq_len, cut to seq_len

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, index: torch.Tensor | list[int]) -> Packed:
        index = torch.as_tensor(index, dtype=torch.long)
        return Packed(self.tokens[index], self.lengths[index], self.truncated)

    @property
    def fill(self) -> float:
        """Share of block slots holding real tokens."""
        return self.lengths.sum().item() / max(1, self.tokens.numel())


def pack_documents(docs: list[list[int]], seq_len: int, pad_id: int) -> Packed:
    """Place whole documents (token lists) into blocks of seq_len, best fit, longest first; never split one.

    A document cut at a block boundary would lose the context its last tokens depend on (a judgement without the
    dialogue it judges). Documents longer than seq_len are truncated and counted.
    """
    truncated = sum(len(d) > seq_len for d in docs)
    docs = [d[:seq_len] for d in docs]
    blocks: list[list[int]] = []
    # by_room[r]: blocks with exactly r free slots. Best fit = the smallest room that fits, O(seq_len) per doc.
    by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]
    for i in sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i)):
        need = len(docs[i])
        room = next((r for r in range(need, seq_len + 1) if by_room[r]), None)
        if room is None:
            blocks.append([])
            b = len(blocks) - 1
        else:
            b = by_room[room].pop()
        blocks[b].extend(docs[i])
        by_room[seq_len - len(blocks[b])].append(b)
    tokens = torch.full((len(blocks), seq_len), pad_id, dtype=torch.long)
    for b, ids in enumerate(blocks):
        tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(b) for b in blocks], dtype=torch.long)
    return Packed(tokens, lengths, truncated)


def padding_mask(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """True on padding slots, found by position, not by id: with pad == eos (most hub tokenizers) an id test
    would also hit every document-ending EOS."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return positions[None, :] >= lengths.to(tokens.device)[:, None]


def lm_labels(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Labels for causal-LM loss: the tokens, -100 on padding slots (so every EOS keeps its label)."""
    return tokens.masked_fill(padding_mask(tokens, lengths), -100)


def unigram_loss(train: Packed, held_out: Packed) -> float:
    """Cross-entropy (nats/token) of an add-one unigram model on held-out targets: the floor an LM must beat."""
    train_ids = train.tokens[~padding_mask(train.tokens, train.lengths)]
    real = ~padding_mask(held_out.tokens, held_out.lengths)
    targets = held_out.tokens[:, 1:][real[:, 1:]]  # position 0 is never a target
    vocab = int(max(train_ids.max(), targets.max())) + 1
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    return -(counts / counts.sum()).log()[targets].mean().item()


def micro_batch_positions(
    step: int, micro: int, rank: int, world: int, micro_batch_size: int, batch_size: int
):
    """Positions in the endless data stream read by one micro-batch of `rank` at optimizer step `step` (from 0).

    Step s reads positions [s * batch_size, (s + 1) * batch_size); micro-batch m of rank r takes slice
    (m * world + r): one process with accumulation and N processes read the same global batch.
    """
    start = step * batch_size + (micro * world + rank) * micro_batch_size
    return range(start, start + micro_batch_size)


class EpochOrder:
    """Maps stream positions to block indices through a seeded permutation per epoch.

    Each epoch's permutation depends only on (seed, epoch), so a batch straddling an epoch boundary reads the end
    of one permutation and the start of the next, and a resumed run can recompute any position.
    """

    def __init__(self, n_blocks: int, seed: int):
        self.n, self.seed = n_blocks, seed
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def __call__(self, positions) -> torch.Tensor:
        return torch.stack([self.permutation(p // self.n)[p % self.n] for p in positions])
