"""The model side of the search: batched forwards over rows that continue cached states (KV segments).

A row is (prefix, tokens): a tuple of KV segments (the committed state, then one segment per tree node on the
path, then the rows' own) and the new tokens to run on top. Rows with different prefixes and lengths share one
forward: each row's past is copied right-padded into one batch cache, new tokens are right-padded after it,
and the attention mask and position ids skip the holes. The forward returns each row's next-token logits and
the KV of its new tokens as a new segment, which the tree keeps on the node (so a node's state is never
recomputed: a leaf's cache is its ancestors' segments, concatenated when a row needs it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class HFCodec:
    """Codec over a transformers tokenizer, as every stage tokenizes (alignlab/data/examples.py): encode renders an
    HH prompt in the model's chat format and adds its BOS; decode reads ids as the continuation of a prompt
    (special tokens dropped, a SentencePiece answer's leading space kept)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        from alignlab.data.examples import prompt_ids

        return prompt_ids(self.tokenizer, text)

    def decode(self, ids: list[int]) -> str:
        from alignlab.data.examples import decode_answer

        return decode_answer(self.tokenizer, ids)


@dataclass(frozen=True, eq=False)
class KV:
    """Keys and values of a run of tokens: data [layers, 2, heads, length, head_dim]."""

    data: torch.Tensor

    @property
    def length(self) -> int:
        return self.data.shape[3]

    def __add__(self, other: KV) -> KV:
        return KV(torch.cat([self.data, other.data], dim=3))


class ForwardCounter:
    """Counts every forward of a module (calls, rows, token positions), whoever calls it: a forward hook."""

    def __init__(self, module: torch.nn.Module):
        self.calls = self.rows = self.tokens = 0
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.calls += 1
            self.rows += ids.shape[0]
            self.tokens += ids.numel()

    def snapshot(self) -> dict[str, int]:
        return {"calls": self.calls, "rows": self.rows, "tokens": self.tokens}

    def remove(self) -> None:
        self._handle.remove()


class HFBackend:
    """Batched, cached forwards of a transformers causal LM (any model whose cache is a DynamicCache)."""

    def __init__(self, model, pad_id: int):
        self.model = model.eval()
        self.pad_id = pad_id
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def extend(
        self, rows: list[tuple[tuple[KV, ...], list[int]]], want_cache: bool = True
    ) -> tuple[list[KV] | None, torch.Tensor]:
        """Run each row's tokens on top of its prefix: -> (new-token segments or None, next-token logits [R, V]).

        Every row needs >= 1 new token. Shapes: past [layers, 2, R, heads, P, head_dim] with P the longest prefix,
        new tokens [R, N]; row r's prefix fills past columns [0, T_r), its tokens columns [P, P + n_r).
        """
        from transformers import DynamicCache

        R = len(rows)
        past_len = [sum(seg.length for seg in prefix) for prefix, _ in rows]
        new_len = [len(toks) for _, toks in rows]
        if min(new_len) < 1:
            raise ValueError("every row needs at least one new token")
        P, N = max(past_len), max(new_len)
        ids = torch.full((R, N), self.pad_id, dtype=torch.long)
        mask = torch.zeros((R, P + N), dtype=torch.long)
        pos = torch.zeros((R, N), dtype=torch.long)
        cache = None
        if P > 0:
            template = next(seg.data for prefix, _ in rows for seg in prefix)
            layers, _, heads, _, dim = template.shape
            past = template.new_zeros((layers, 2, R, heads, P, dim))
            for r, (prefix, _) in enumerate(rows):
                off = 0
                for seg in prefix:
                    past[:, :, r, :, off : off + seg.length] = seg.data
                    off += seg.length
            cache = DynamicCache()
            for layer in range(layers):
                cache.update(past[layer, 0], past[layer, 1], layer)
        for r, (_, toks) in enumerate(rows):
            ids[r, : new_len[r]] = torch.tensor(toks, dtype=torch.long)
            mask[r, : past_len[r]] = 1
            mask[r, P : P + new_len[r]] = 1
            # Positions count real tokens only; padded slots get any position (they are masked out).
            pos[r] = past_len[r] + torch.arange(N)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device),
            past_key_values=cache,
            use_cache=want_cache,
        )
        last = torch.tensor(new_len) - 1
        logits = out.logits[torch.arange(R), last.to(self.device)].float().cpu()
        if not want_cache:
            return None, logits
        layers = out.past_key_values.layers
        stacked = torch.stack([torch.stack([lay.keys[:, :, P:], lay.values[:, :, P:]]) for lay in layers])
        # stacked [layers, 2, R, heads, N, dim] -> one segment per row, its own new tokens only
        segs = [KV(stacked[:, :, r, :, : new_len[r]].clone()) for r in range(R)]
        return segs, logits
