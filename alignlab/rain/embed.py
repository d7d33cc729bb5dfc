"""Pluggable embedders for RAIN's similarity updates and dynamic addition: texts -> unit vectors [N, D].

The thresholds (cos >= 0.95; ||var|| < 0.03 * len) were set for all-MiniLM-L6-v2, whose embeddings are unit
length; the default embedder (no extra model) is the same LM's mean-pooled last hidden state, L2-normalised so the
same thresholds apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignlab.rain.evaluator import Codec


class LMEmbedder:
    """Mean of the last hidden state over the text's tokens (BOS excluded: it is the same for every text)."""

    def __init__(self, model, codec: Codec, pad_id: int, bos_id: int | None = None, batch_size: int = 256):
        self.model, self.codec, self.pad_id, self.batch_size = model.eval(), codec, pad_id, batch_size
        self.bos_id = bos_id
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        encoded = [self.codec.encode(t) or [self.pad_id] for t in texts]
        for start in range(0, len(texts), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            # Right padding: a causal model's real positions never see the pads after them.
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            weight = torch.zeros((len(chunk), width))
            for r, row in enumerate(chunk):
                ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
                first = 1 if len(row) > 1 and row[0] == self.bos_id else 0  # an empty text keeps its BOS
                weight[r, first : len(row)] = 1
            lengths = torch.tensor([len(row) for row in chunk])
            hidden = self.model(
                input_ids=ids.to(self.device),
                attention_mask=(torch.arange(width)[None] < lengths[:, None]).long().to(self.device),
                output_hidden_states=True,
                use_cache=False,
            ).hidden_states[-1]
            w = weight.to(hidden.device, hidden.dtype).unsqueeze(-1)
            pooled = (hidden * w).sum(1) / w.sum(1)
            out.append(F.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out)


class SentenceTransformerEmbedder:
    """The authors' embedder (sentence-transformers/all-MiniLM-L6-v2 by default): pip install sentence-transformers."""

    def __init__(self, name: str, device: str | torch.device = "cpu"):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(
                "stage.embedder=sentence_transformers needs `pip install sentence-transformers` "
                "(or use stage.embedder=lm, the same LM's hidden states)"
            ) from e
        self.model = SentenceTransformer(name, device=str(device))

    def embed(self, texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(self.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True))
