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
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_sequences(seqs[start : start + batch_size], tokenizer.pad_token_id)
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
