"""Scoring (prompt, response) text with reward models: the score at the last non-pad token, a model's stored
normalisation, and RewardScorer (one reward model, or Llama 2's helpfulness + safety pair) for PPO, rejection
sampling, context distillation, eval and RAIN. The reward math itself is alignlab/rl/rewards.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from alignlab import models
from alignlab.checkpoint import atomic_write_json
from alignlab.data.examples import sequence_ids
from alignlab.rl.rewards import Normalization, llama2_reward
from alignlab.tensors import pad_sequences, position_ids

NORMALIZATION_FILE = "reward_normalization.json"
KINDS = ("single", "llama2")  # reward.kind: one reward model, or Llama 2's helpfulness + safety pair


@torch.no_grad()
def score_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model scores [B] of padded sequences [B, T] (left or right padding).

    AutoModelForSequenceClassification reads the score at the rightmost token that is not the pad id, i.e. the
    EOS ending the response (with pad == eos, the token before trailing EOS/pads, as in training); positions are
    counted over real tokens so extra padding on either side changes nothing.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.logits.squeeze(-1).float()


def score_texts(
    model, tokenizer, prompts: list[str], responses: list[str], device, batch_size: int = 32
) -> torch.Tensor:
    """Reward-model scores [len(prompts)] of prompt + response + EOS, right-padded in batches, on the CPU."""
    seqs = [sequence_ids(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    return score_id_batches(model, seqs, tokenizer.pad_token_id, device, batch_size)


def score_id_batches(model, seqs: list[list[int]], pad_id: int, device, batch_size: int = 32) -> torch.Tensor:
    """Reward-model scores [len(seqs)] of token-id sequences, right-padded in batches, on the CPU."""
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_sequences(seqs[start : start + batch_size], pad_id)
        out.append(score_sequences(model, ids.to(device), mask.to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def save_normalization(norm: Normalization, model_dir: str | Path) -> None:
    atomic_write_json(Path(model_dir) / NORMALIZATION_FILE, norm.__dict__)


def load_normalization(model_dir: str | Path) -> Normalization:
    """The stored normalisation of a reward model directory; identity when it has none."""
    path = Path(model_dir) / NORMALIZATION_FILE
    if not path.exists():
        return Normalization()
    values = json.loads(path.read_text())
    if not all(math.isfinite(values[k]) for k in ("gain", "bias")):
        raise ValueError(f"{path}: gain/bias are not finite: {values}")
    return Normalization(**values)


class RewardScorer:
    """Scores (prompt, response) text with one reward model, or with Llama 2's helpfulness + safety pair.

    kind=single: the RM's score after its stored normalisation (when normalize). kind=llama2: the two raw scores
    combined by llama2_reward (the threshold is on the raw sigmoid, so stored normalisations do not apply).
    """

    def __init__(
        self,
        *,
        kind: str,
        reward_model: str | None = None,
        helpful_model: str | None = None,
        safety_model: str | None = None,
        safety_threshold: float = 0.15,
        normalize: bool = True,
        whiten: bool = True,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        dtype: str = "float32",
    ):
        if kind not in KINDS:
            raise ValueError(f"reward.kind={kind!r}; choose one of {', '.join(KINDS)}")
        self.kind, self.threshold, self.whiten, self.batch_size = kind, safety_threshold, whiten, batch_size
        self.device = torch.device(device)
        paths = (
            {"reward": reward_model}
            if kind == "single"
            else {"helpful": helpful_model, "safety": safety_model}
        )
        self.paths = dict(paths)  # role -> the model directory it was loaded from (compute.json's inputs)
        self.models, self.norms = {}, {}
        for role, path in paths.items():
            if not path:
                raise ValueError(
                    f"reward.kind={kind} needs reward.{role}_model"
                    if role != "reward"
                    else "reward.kind=single needs reward.reward_model"
                )
            self.models[role] = models.load_reward_model(path, dtype=dtype).to(self.device).eval()
            self.norms[role] = load_normalization(path) if normalize else Normalization()
        self.tokenizer = models.load_tokenizer(next(iter(paths.values())))

    @property
    def params(self) -> int:
        """Parameters of every reward model a score runs through (both of Llama 2's pair)."""
        return sum(models.count_parameters(m) for m in self.models.values())

    @classmethod
    def from_config(cls, r, *, device, dtype: str = "float32", whiten: bool | None = None) -> RewardScorer:
        """The scorer of a `reward=` config node; whiten overrides reward.whiten (rejection sampling compares
        scores across batches, so it turns per-batch whitening off)."""
        return cls(
            kind=r.kind,
            reward_model=r.reward_model,
            helpful_model=r.helpful_model,
            safety_model=r.safety_model,
            safety_threshold=r.safety_threshold,
            normalize=r.normalize,
            whiten=r.whiten if whiten is None else whiten,
            batch_size=r.batch_size,
            device=device,
            dtype=dtype,
        )

    def raw_scores(self, role: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return score_texts(
            self.models[role], self.tokenizer, prompts, responses, self.device, self.batch_size
        )

    def __call__(
        self, prompts: list[str], responses: list[str], is_safety: list[bool] | None = None
    ) -> torch.Tensor:
        """Rewards [B] for the responses to the prompts (is_safety: per prompt, needed for kind=llama2)."""
        return self._combine(lambda role: self.raw_scores(role, prompts, responses), is_safety)

    def score_ids(self, sequences: list[list[int]], is_safety: list[bool] | None = None) -> torch.Tensor:
        """Rewards [N] of token-id sequences in the reward models' tokenizer (prompt + answer, each ending with
        the EOS the models read their score at; reward-guided decoding scores its candidate prefixes this way)."""
        pad = self.tokenizer.pad_token_id

        def raw(role: str) -> torch.Tensor:
            return score_id_batches(self.models[role], sequences, pad, self.device, self.batch_size)

        return self._combine(raw, is_safety)

    def _combine(self, raw, is_safety: list[bool] | None) -> torch.Tensor:
        """One RM's normalised score, or Llama 2's combination of the pair's raw scores; raw(role) -> [B]."""
        if self.kind == "single":
            return self.norms["reward"](raw("reward"))
        if is_safety is None:
            raise ValueError("reward.kind=llama2 needs each prompt's is_safety flag")
        return llama2_reward(
            raw("helpful"), raw("safety"), torch.tensor(is_safety), self.threshold, self.whiten
        )


class PrefixScores:
    """Reward-model scores of growing answers, one KV cache per reward model: what ARGS asks at every token.

    begin(prompts) encodes the prompts once; candidates(rows, tokens [n, k]) scores, for each of the n rows (indices
    into the prompts), its prefix + each candidate token + the EOS the models read their score at (the same number
    score_ids gives that sequence, up to float rounding; a candidate that is the EOS is read there), feeding only
    those 2 tokens per candidate on a copy of
    the row's cache; advance(rows, tokens [n]) appends the chosen token to those rows' prefixes. Finished rows are
    simply no longer asked about. `tokens` counts the positions each reward model computed (cost accounting).
    Needs plain full-attention caches (Llama-style models); combination and normalisation as RewardScorer's.
    """

    def __init__(self, scorer: RewardScorer, end_id: int, is_safety: list[bool] | None = None):
        self.scorer, self.end_id, self.is_safety = scorer, end_id, is_safety
        self.tokens = 0

    def begin(self, prompts: list[list[int]]) -> None:
        ids, mask = pad_sequences(prompts, self.scorer.tokenizer.pad_token_id, "left")
        ids, self.mask = ids.to(self.scorer.device), mask.to(self.scorer.device)
        self.rows = list(range(len(prompts)))  # prompt index of each row of the caches
        self.caches, self.last = {}, {}  # last: each row's score at its last token (pad == eos reads it)
        for role in self.scorer.models:
            scores, self.caches[role] = self._forward(role, ids, self.mask, position_ids(self.mask), None)
            self.last[role] = scores[:, -1]
        self.next_position = self.mask.sum(1)
        self.tokens += ids.numel()

    def _forward(self, role: str, ids, mask, positions, cache):
        return models.score_head_forward(
            self.scorer.models[role], ids, mask, positions, cache, use_cache=True
        )

    def _select(self, rows: list[int]) -> torch.Tensor:
        where = {r: i for i, r in enumerate(self.rows)}
        return torch.tensor([where[r] for r in rows], device=self.mask.device)

    @torch.no_grad()
    def candidates(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        from transformers.cache_utils import DynamicCache

        n, k = tokens.shape
        pick = self._select(rows).repeat_interleave(k)
        ids = torch.stack([tokens.reshape(-1), torch.full_like(tokens.reshape(-1), self.end_id)], 1)
        ids = ids.to(self.mask.device)
        mask = torch.cat([self.mask[pick], torch.ones_like(ids)], 1)
        positions = self.next_position[pick][:, None] + torch.arange(ids.shape[1], device=ids.device)
        raw = {}
        for role, cache in self.caches.items():
            copy = DynamicCache()
            for i, layer in enumerate(cache.layers):
                copy.update(layer.keys[pick], layer.values[pick], i)
            scores = self._forward(role, ids, mask, positions, copy)[0]
            # read after the appended end token, or at a candidate that is itself the end (an EOS). With pad == eos
            # a model reads the token before the trailing EOS (score_sequences): the candidate, or for an EOS
            # candidate the prefix's last token
            if self.end_id == self.scorer.tokenizer.pad_token_id:
                read = torch.where(ids[:, 0] == self.end_id, self.last[role][pick], scores[:, 0])
            else:
                read = torch.where(ids[:, 0] == self.end_id, scores[:, 0], scores[:, 1])
            raw[role] = read.cpu()
        self.tokens += ids.numel()
        flags = None if self.is_safety is None else [self.is_safety[r] for r in rows for _ in range(k)]
        return self.scorer._combine(lambda role: raw[role], flags).view(n, k)

    @torch.no_grad()
    def advance(self, rows: list[int], tokens: torch.Tensor) -> None:
        keep = self._select(rows)
        for cache in self.caches.values():
            cache.batch_select_indices(keep)
        self.rows, self.mask = list(rows), torch.cat([self.mask[keep], self.mask.new_ones(len(rows), 1)], 1)
        ids = tokens.reshape(-1, 1).to(self.mask.device)
        positions = self.next_position[keep][:, None]
        for role in self.caches:
            scores, self.caches[role] = self._forward(role, ids, self.mask, positions, self.caches[role])
            self.last[role] = scores[:, -1]
        self.next_position = self.next_position[keep] + 1
        self.tokens += ids.numel()
