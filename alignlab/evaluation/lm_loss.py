"""Language-modelling loss on held-out packed text: mean next-token NLL (nats per target token).

One evaluator, lm_eval_loss, measures stage=pretrain's eval/loss, PPO's eval/ptx_loss and stage=eval's ptx_loss;
AlignmentTax measures many models on the same text, each through its own tokenizer (stage=eval's alignment tax).
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
import torch.nn.functional as F

from alignlab import distributed, models
from alignlab.data.packing import Packed, lm_labels
from alignlab.data.text_blocks import pack_texts
from alignlab.rl.losses import lm_loss


@torch.no_grad()
def lm_eval_loss(
    model,
    blocks: Packed,
    micro_batch_size: int,
    device,
    *,
    collective: bool = False,
    shard: tuple[int, int] | None = None,
    token_sums: bool = False,
) -> float:
    """Mean next-token NLL over every non-pad target of `blocks` (position 0 of a block is never a target).

    model: a causal LM (or a DeepSpeed engine around one) returning `.logits` [B, L, V] for input_ids [B, L]; it is
    run in eval mode and its train/eval mode is restored afterwards.
    collective: every rank calls this; totals are averaged over ranks, so every rank returns the same number.
        False: this process alone (stage=eval, where only rank 0 works).
    shard: (rank, world_size) to evaluate only this rank's blocks (rank, rank + world, ...); needs collective.
        Every rank then runs the same number of forwards (an all-padding block where its shard ran out): under
        ZeRO-3 each forward gathers parameters collectively, and a rank that stopped early would hang the others.
        None: every rank evaluates every block.
    token_sums: add every token's NLL in float64 (stage=pretrain's eval/loss). False: add each micro-batch's mean
        NLL times its target count (PPO's eval/ptx_loss, stage=eval's ptx_loss). The two agree to float rounding;
        each stage keeps its own so that its logged numbers stay those of earlier runs.
    """
    if shard is not None and not collective:
        raise ValueError("lm_eval_loss: shard= splits blocks over ranks, which needs collective=True")
    rank, world = shard if shard is not None else (0, 1)
    mine = blocks.subset(list(range(rank, len(blocks), world))) if shard is not None else blocks
    n_forwards = math.ceil(len(blocks) / (world * micro_batch_size))
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64) if token_sums else 0.0
    count = 0
    for i in range(n_forwards):
        part = mine.subset(list(range(i * micro_batch_size, min((i + 1) * micro_batch_size, len(mine)))))
        if len(part) == 0:  # this rank's shard ran out: a block of padding only (no targets) keeps it in step
            part = Packed(blocks.tokens[:1], torch.zeros(1, dtype=torch.long), 0)
        x = part.tokens.to(device)
        labels = lm_labels(x, part.lengths)
        logits = model(input_ids=x, use_cache=False).logits
        n = int((labels[:, 1:] != -100).sum())
        if token_sums:
            total += F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1),
                labels[:, 1:].flatten(),
                ignore_index=-100,
                reduction="sum",
            ).cpu()
        elif n:  # (a block of one token has no target: its mean would be NaN)
            total += lm_loss(logits, labels).item() * n
        count += n
    model.train(was_training)
    total = float(total)
    if collective:  # token-weighted over ranks, so the result does not depend on how blocks were sharded
        return distributed.mean_over_ranks(total) / max(1e-9, distributed.mean_over_ranks(float(count)))
    return total / max(1, count)


def tokenizer_key(tokenizer) -> str:
    """What decides a tokenizer's ids: its full definition (fast tokenizers) or vocabulary, and its special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = (type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.pad_token_id, spec)
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


class AlignmentTax:
    """Mean next-token NLL (nats per token of the model's OWN tokenizer) of each model on the held-out pretraining
    text: the text is tokenized with every model's own tokenizer (packed blocks cached per tokenizer), so no model
    is ever fed another model's token ids. The first n_blocks blocks of each tokenization are measured, in blocks of
    seq_len tokens (capped at the model's max_position_embeddings), micro_batch_size blocks per forward."""

    def __init__(
        self, texts: list[str], n_blocks: int, device, *, seq_len: int = 256, micro_batch_size: int = 8
    ):
        self.texts, self.n_blocks, self.device = texts, n_blocks, device
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.blocks: dict[tuple[str, int], Packed] = {}  # (tokenizer key, block length) -> blocks
        self.tokenizers: dict[str, str] = {}  # model -> tokenizer key (the models measured)

    def blocks_for(self, tokenizer, seq_len: int) -> Packed:
        """The first n_blocks blocks of the text packed with this tokenizer (cached)."""
        key = (tokenizer_key(tokenizer), seq_len)
        if key not in self.blocks:
            blocks = pack_texts(self.texts, tokenizer, seq_len)
            self.blocks[key] = blocks.subset(list(range(min(self.n_blocks, len(blocks)))))
        return self.blocks[key]

    def __call__(self, model_path: str) -> tuple[float | None, str | None]:
        """(loss, None), or (None, why this model's tax cannot be measured)."""
        tokenizer = models.load_tokenizer(model_path)
        model = models.load_causal_lm(model_path).to(self.device).eval()
        max_len = getattr(model.config, "max_position_embeddings", None) or self.seq_len
        blocks = self.blocks_for(tokenizer, min(self.seq_len, max_len))
        rows = model.get_input_embeddings().num_embeddings
        if int(blocks.tokens.max()) >= rows:
            return None, (
                f"its tokenizer produces ids up to {int(blocks.tokens.max())}, beyond the model's {rows} embeddings"
            )
        self.tokenizers[model_path] = tokenizer_key(tokenizer)
        return lm_eval_loss(model, blocks, self.micro_batch_size, self.device), None
