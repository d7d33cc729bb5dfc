"""Rollouts shared by the RL stages (PPO, rejection sampling, context distillation): prompts -> token ids ->
sampled responses (KV cache, EOS truncation) -> decoded text for the reward scorer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignlab.data.examples import prompt_ids
from alignlab.generation import generate_tokens
from alignlab.rl.rewards import pad_sequences


@dataclass
class Prompts:
    """Tokenized prompts that fit the length budget, with their safety flags (Llama 2's two-RM rule)."""

    texts: list[str]
    ids: list[list[int]]
    is_safety: list[bool]
    dropped: int  # prompts longer than the budget (counted and logged by the caller, never silently lost)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index) -> Prompts:
        index = [int(i) for i in index]
        return Prompts(
            [self.texts[i] for i in index],
            [self.ids[i] for i in index],
            [self.is_safety[i] for i in index],
            0,
        )


def tokenize_prompts(tokenizer, rows: list[dict], max_length: int) -> Prompts:
    """rows: {"prompt", "is_safety"?}; prompts longer than max_length tokens are dropped and counted."""
    texts, ids, flags, dropped = [], [], [], 0
    for row in rows:
        tokens = prompt_ids(tokenizer, row["prompt"])
        if len(tokens) > max_length:
            dropped += 1
            continue
        texts.append(row["prompt"])
        ids.append(tokens)
        flags.append(bool(row.get("is_safety", False)))
    return Prompts(texts, ids, flags, dropped)


@dataclass
class Rollout:
    """One batch of episodes: left-padded queries [B, Lq] followed by right-padded responses [B, T]."""

    prompts: Prompts
    query: torch.Tensor  # [B, Lq] left-padded prompt ids
    query_mask: torch.Tensor  # [B, Lq]
    response: torch.Tensor  # [B, T] sampled ids, pad after the first EOS
    response_mask: torch.Tensor  # [B, T] 1 up to and including the EOS
    ended: torch.Tensor  # [B] bool: the answer ended with EOS within the budget
    texts: list[str]  # decoded answers (no EOS, no special tokens): what the reward model scores

    @property
    def context_len(self) -> int:
        return self.query.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)


def sample_rollout(
    model,
    tokenizer,
    prompts: Prompts,
    *,
    max_new_tokens: int,
    temperature: float,
    device,
    synced_gpus: bool = False,
) -> Rollout:
    """Sample one answer per prompt (all of them as one batch) and decode it."""
    query, query_mask = pad_sequences(prompts.ids, tokenizer.pad_token_id, side="left")
    query, query_mask = query.to(device), query_mask.to(device)
    response, mask, ended = generate_tokens(
        model,
        query,
        query_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        synced_gpus=synced_gpus,
    )
    # The EOS is not part of the answer's text (the reward model appends its own, as in training).
    without_eos = response.masked_fill(response == tokenizer.eos_token_id, tokenizer.pad_token_id)
    texts = [
        tokenizer.decode(row[m.bool()], skip_special_tokens=True)
        for row, m in zip(without_eos.cpu(), mask.cpu(), strict=True)
    ]
    return Rollout(prompts, query, query_mask, response, mask, ended, texts)
