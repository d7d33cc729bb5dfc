"""Reward-model scoring: the score at the last non-pad token, normalisation, Llama 2's helpfulness + safety rule.

The tensor functions are pure; RewardScorer loads the configured reward model(s) and scores (prompt, response)
text for PPO and rejection sampling.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

NORMALIZATION_FILE = "reward_normalization.json"
KINDS = ("single", "llama2")  # reward.kind: one reward model, or Llama 2's helpfulness + safety pair


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: left padding does not shift them. [B, T] -> [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def score_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model scores [B] of padded sequences [B, T] (left or right padding).

    AutoModelForSequenceClassification reads the score at the rightmost token that is not the pad id, i.e. the
    EOS ending the response (with pad == eos, the token before trailing EOS/pads, as in training); positions are
    counted over real tokens so extra padding on either side changes nothing.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.logits.squeeze(-1).float()


def pad_sequences(
    seqs: list[list[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T] from token lists."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def score_texts(
    model, tokenizer, prompts: list[str], responses: list[str], device, batch_size: int = 32
) -> torch.Tensor:
    """Reward-model scores [len(prompts)] of prompt + response + EOS, right-padded in batches, on the CPU."""
    from alignlab.data.examples import sequence_ids

    seqs = [sequence_ids(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_sequences(seqs[start : start + batch_size], tokenizer.pad_token_id)
        out.append(score_sequences(model, ids.to(device), mask.to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the whole tensor; a batch of one (or all-equal values) is only centred."""
    centred = x - x.mean()
    if x.numel() < 2:
        return centred
    return centred / (x.std() + eps)


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log(p / (1 - p)) with p clamped to [eps, 1 - eps] so 0 and 1 stay finite."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def llama2_select(
    z_helpful: torch.Tensor, z_safety: torch.Tensor, is_safety: torch.Tensor, threshold: float = 0.15
) -> torch.Tensor:
    """Llama 2's R_c in [0, 1]: sigmoid(safety score) where the prompt is safety-tagged or that score is below the
    threshold, sigmoid(helpfulness score) elsewhere. z_*: raw RM outputs [B]; is_safety: bool [B]."""
    r_h, r_s = torch.sigmoid(z_helpful.float()), torch.sigmoid(z_safety.float())
    use_safety = is_safety.bool() | (r_s < threshold)
    return torch.where(use_safety, r_s, r_h)


def llama2_reward(
    z_helpful: torch.Tensor,
    z_safety: torch.Tensor,
    is_safety: torch.Tensor,
    threshold: float = 0.15,
    whiten_batch: bool = True,
) -> torch.Tensor:
    """R~ = WHITEN(LOGIT(R_c)) (Llama 2 §3.2.2); the caller subtracts the KL penalty."""
    r = logit(llama2_select(z_helpful, z_safety, is_safety, threshold))
    return whiten(r) if whiten_batch else r


@dataclass(frozen=True)
class Normalization:
    """score -> gain * score + bias; fitted so reference-policy samples score mean 0, std 1 (lm-human-preferences)."""

    gain: float = 1.0
    bias: float = 0.0
    fitted_on: int = 0  # samples the statistics came from (0 = identity, never fitted)
    mean: float = 0.0  # raw score mean of those samples
    std: float = 1.0  # raw score std of those samples

    @classmethod
    def fit(cls, scores: torch.Tensor, eps: float = 1e-8) -> Normalization:
        if scores.numel() < 2:
            raise ValueError(f"reward normalisation needs at least 2 samples, got {scores.numel()}")
        mean, std = scores.double().mean().item(), scores.double().std().item()
        gain = 1.0 / (std + eps)
        return cls(gain=gain, bias=-mean * gain, fitted_on=scores.numel(), mean=mean, std=std)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * self.gain + self.bias

    def save(self, model_dir: str | Path) -> None:
        from alignlab.checkpoint import atomic_write_json

        atomic_write_json(Path(model_dir) / NORMALIZATION_FILE, self.__dict__)

    @classmethod
    def load(cls, model_dir: str | Path) -> Normalization:
        """The stored normalisation of a reward model directory; identity when it has none."""
        path = Path(model_dir) / NORMALIZATION_FILE
        if not path.exists():
            return cls()
        values = json.loads(path.read_text())
        if not all(math.isfinite(values[k]) for k in ("gain", "bias")):
            raise ValueError(f"{path}: gain/bias are not finite: {values}")
        return cls(**values)


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
        from alignlab import models

        if kind not in KINDS:
            raise ValueError(f"reward.kind={kind!r}; choose one of {', '.join(KINDS)}")
        self.kind, self.threshold, self.whiten, self.batch_size = kind, safety_threshold, whiten, batch_size
        self.device = torch.device(device)
        paths = (
            {"reward": reward_model}
            if kind == "single"
            else {"helpful": helpful_model, "safety": safety_model}
        )
        self.models, self.norms = {}, {}
        for role, path in paths.items():
            if not path:
                raise ValueError(
                    f"reward.kind={kind} needs reward.{role}_model"
                    if role != "reward"
                    else "reward.kind=single needs reward.reward_model"
                )
            self.models[role] = models.load_reward_model(path, dtype=dtype).to(self.device).eval()
            self.norms[role] = Normalization.load(path) if normalize else Normalization()
        self.tokenizer = models.load_tokenizer(next(iter(paths.values())))

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
        if self.kind == "single":
            return self.norms["reward"](self.raw_scores("reward", prompts, responses))
        if is_safety is None:
            raise ValueError("reward.kind=llama2 needs each prompt's is_safety flag")
        z_h = self.raw_scores("helpful", prompts, responses)
        z_s = self.raw_scores("safety", prompts, responses)
        return llama2_reward(z_h, z_s, torch.tensor(is_safety), self.threshold, self.whiten)
