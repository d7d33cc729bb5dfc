"""Rollouts shared by the RL stages (PPO, rejection sampling, context distillation): prompt rows -> token ids ->
sampled responses (KV cache, EOS truncation) -> decoded text for the reward scorer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignlab import models
from alignlab.data.examples import decode_answer, prompt_ids
from alignlab.data.splits import seeded_split
from alignlab.generation import generate_tokens
from alignlab.tensors import pad_sequences

log = logging.getLogger("alignlab.rollout")


def load_prompt_rows(cfg: DictConfig, data_dir: Path | None) -> list[dict]:
    """{"prompt", "is_safety", ...} rows: TinyHH's RL prompts, or any prompt / HH / preference data via `datasets`.

    Columns beyond prompt and is_safety (a risk category, say) are kept for the stages that use them.
    """
    from alignlab.data.formats import canonicalize
    from alignlab.data.loading import load_rows

    d = cfg.data
    if data_dir is not None:
        return load_rows(str(data_dir / "rl_prompts.jsonl")).to_list()
    ds = load_rows(d.source, d.train_split)
    if d.max_rows is not None:
        ds = ds.select(range(min(d.max_rows, len(ds))))
    if "prompt" not in ds.column_names or (ds.num_rows and not isinstance(ds[0]["prompt"], str)):
        # canonicalize logs what it skipped; conversational (TRL) prompts become HH transcripts, rendered later
        ds, _ = canonicalize(ds, d.format, "prompt_completion", source=d.source, on_malformed=d.on_malformed)
    if "is_safety" not in ds.column_names:
        log.warning(
            "%s has no is_safety column: every prompt counts as not safety-tagged (Llama 2's two-RM rule uses the "
            "safety RM only below its threshold; context distillation finds no prompts)",
            d.source,
        )
    return [{**r, "is_safety": bool(r.get("is_safety", False))} for r in ds.to_list()]


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
    # [B, T] each answer token's log-prob under the sampling distribution, from the sampling pass (return_logprobs)
    logprobs: torch.Tensor | None = None

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
    return_logprobs: bool = False,
) -> Rollout:
    """Sample one answer per prompt (all of them as one batch) and decode it (return_logprobs: keep the sampled
    tokens' log-probs from the sampling pass, Rollout.logprobs)."""
    query, query_mask = pad_sequences(prompts.ids, tokenizer.pad_token_id, side="left")
    query, query_mask = query.to(device), query_mask.to(device)
    response, mask, ended, *logprobs = generate_tokens(
        model,
        query,
        query_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        synced_gpus=synced_gpus,
        return_logprobs=return_logprobs,
    )
    # The EOS is not part of the answer's text (the reward model appends its own, as in training); decoded as a
    # continuation of the prompt, so prompt + text re-reads as the model's tokens (SentencePiece's leading space)
    texts = [
        decode_answer(tokenizer, [t for t in row[m.bool()].tolist() if t != tokenizer.eos_token_id])
        for row, m in zip(response.cpu(), mask.cpu(), strict=True)
    ]
    return Rollout(
        prompts, query, query_mask, response, mask, ended, texts, logprobs[0] if logprobs else None
    )


def load_prompts(
    cfg: DictConfig, data_dir: Path | None, tokenizer, n_eval: int, max_length: int, world_size: int
) -> tuple[Prompts, Prompts]:
    """(train, held-out) tokenized prompts of the stage's prompt data; over-long prompts dropped and logged.

    Held out: at most a fifth of the rows, a multiple of the world size (every rank evaluates as many prompts:
    ZeRO-3 forwards are collective), from one seeded order.
    """
    train_rows, eval_rows = seeded_split(
        load_prompt_rows(cfg, data_dir), n_eval, cfg.seed, max_share=5, multiple_of=world_size
    )
    train, held_out = (
        tokenize_prompts(tokenizer, train_rows, max_length),
        tokenize_prompts(tokenizer, eval_rows, max_length),
    )
    if train.dropped or held_out.dropped:
        log.warning(
            "%d train / %d eval prompts are longer than stage.max_prompt_length=%d tokens and were dropped",
            train.dropped,
            held_out.dropped,
            max_length,
        )
    return train, held_out


def load_sampler(path: str | Path, *, dtype: str, trust_remote_code: bool, device):
    """A saved causal LM to sample from: dropout off, on device, in eval mode."""
    model = models.load_causal_lm(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    models.disable_dropout(model)
    return model.to(device).eval()


def sample_one(model, tokenizer, prompts: Prompts, **kwargs) -> tuple[list[str], list[bool]]:
    """One answer per prompt (sample_answers with k=1, flattened): (texts [P], ended [P])."""
    texts, ended = sample_answers(model, tokenizer, prompts, k=1, **kwargs)
    return [t[0] for t in texts], [e[0] for e in ended]


def sample_answers(
    model,
    tokenizer,
    prompts: Prompts,
    *,
    k: int,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    device,
    progress=None,
    positions: list[int] | None = None,
) -> tuple[list[list[str]], list[list[bool]]]:
    """k sampled answers per prompt, in batches of batch_size sequences: (texts [P][k], ended [P][k]).

    The k copies of a prompt are independent samples (rows of one batch draw independently); progress, a tqdm
    bar, advances by one per answer. positions: if given, gets each answer's prompt + answer positions (padding
    left out), in the order of the answers: what the KV-cache sampler computed for it (its compute).
    """
    flat = prompts.take([i for i in range(len(prompts)) for _ in range(k)])
    texts: list[str] = []
    ended: list[bool] = []
    for start in range(0, len(flat), batch_size):
        part = flat.take(range(start, min(start + batch_size, len(flat))))
        ro = sample_rollout(
            model, tokenizer, part, max_new_tokens=max_new_tokens, temperature=temperature, device=device
        )
        texts.extend(ro.texts)
        ended.extend(ro.ended.tolist())
        if positions is not None:
            positions.extend((ro.query_mask.sum(1) + ro.response_mask.sum(1)).tolist())
        if progress is not None:
            progress.update(len(part))
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))], [
        ended[i * k : (i + 1) * k] for i in range(len(prompts))
    ]
