"""Batched sampling with KV cache (HF generate), EOS truncation, stop strings; next-token option scoring."""

from __future__ import annotations

import torch

from alignlab.rl.rewards import position_ids as real_positions

# A model that keeps talking invents the next human turn; the answer ends where that begins.
DEFAULT_STOP = ("\n\nHuman:",)


def cut_at_stop(text: str, stop_strings: tuple[str, ...] = DEFAULT_STOP) -> str:
    cuts = [i for s in stop_strings if (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 32,
    stop_strings: tuple[str, ...] = DEFAULT_STOP,
) -> list[str]:
    """Pure ancestral sampling (top_k=0, top_p=1) at `temperature` (0 = greedy); returns decoded answers."""
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left"
        ).to(device)
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        gen = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        new = gen[:, batch["input_ids"].shape[1] :]
        out.extend(
            cut_at_stop(t, stop_strings) for t in tokenizer.batch_decode(new, skip_special_tokens=True)
        )
    return out


def option_token_id(tokenizer, context: str, option: str) -> int:
    """The single token that `option` adds right after `context` (never a hard-coded vocabulary id)."""
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    ext = tokenizer(context + option, add_special_tokens=False)["input_ids"]
    if ext[: len(base)] != base or len(ext) != len(base) + 1:
        raise ValueError(
            f"option {option!r} is not a single token after {context[-20:]!r} for this tokenizer"
        )
    return ext[-1]


@torch.no_grad()
def next_token_logprobs(
    model, tokenizer, texts: list[str], token_ids: list[int], batch_size: int = 32
) -> torch.Tensor:
    """log p(token | text) for each text and each of token_ids: [len(texts), len(token_ids)]."""
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left"
        ).to(device)
        logits = model(**batch).logits[:, -1, :].float()
        rows.append(torch.log_softmax(logits, dim=-1)[:, token_ids].cpu())
    return torch.cat(rows)


# ------------------------------------------------------------------ token-level rollouts for RL (PPO, rejection sampling)


def truncate_after_eos(response: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens after the first EOS become pad; returns (response [B, T], mask [B, T]: 1 up to and including EOS).

    A row without EOS keeps all T tokens (it ran out of budget; the caller penalises it).
    """
    is_eos = response == eos_id
    seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    mask = (~seen_before).long()
    return response.masked_fill(seen_before, pad_id), mask


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """Every row has ended, here and (synced) on every rank: under ZeRO-3 a rank that stopped would hang the
    others' collective forwards, so it keeps stepping until all are done."""
    if not synced:
        return bool(done.all())
    import torch.distributed as dist

    remaining = torch.tensor([float((~done).sum())], device=done.device)
    dist.all_reduce(remaining)
    return remaining.item() == 0


@torch.no_grad()
def generate_tokens(
    model,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    synced_gpus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample responses to left-padded queries [B, L] with the KV cache: pure ancestral sampling from
    softmax(logits / temperature) (top_k=0, top_p=1), the distribution the log-probs are later computed from.

    A plain loop over the model's forward, not HF generate: no logits processors, so nothing from the model's
    generation_config (repetition_penalty, suppress_tokens, ...) reshapes the distribution, and none of
    generate's per-step bookkeeping (same tokens from the same seed; scripts/bench/bench_rollout.py).
    Returns (response [B, T] padded after the first EOS, mask [B, T], ended_with_eos [B]); T <= max_new_tokens.
    synced_gpus: keep stepping until every rank is done (ZeRO-3, where each forward is collective).
    """
    if temperature <= 0:
        raise ValueError("RL rollouts sample; temperature must be > 0 (greedy rollouts do not explore)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; a rollout needs at least one new token")
    batch, device = len(query), query.device
    mask = query_mask.long()
    position_ids = real_positions(mask)
    input_ids, past = query, None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = []
    for _ in range(max_new_tokens):
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
        token = torch.multinomial(probs, 1).squeeze(1).masked_fill(done, pad_id)
        tokens.append(token)
        done = done | (token == eos_id)
        if _all_done(done, synced_gpus):
            break
        input_ids = token[:, None]
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    response, response_mask = truncate_after_eos(torch.stack(tokens, dim=1), eos_id, pad_id)
    ended = ((response == eos_id) & response_mask.bool()).any(1)
    return response, response_mask, ended


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_len: int):
    """Logits [B, T, V] predicting each response token of query+response input_ids [B, L] (response starts at
    context_len). Positions are counted over real tokens, so left padding of the query changes nothing."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=real_positions(attention_mask),
        use_cache=False,
    ).logits
    return logits[:, context_len - 1 : -1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at the sampled tokens: [B, T, V], [B, T] -> [B, T].

    The temperature divides the logits identically in rollout, reference and training log-probs; a mismatch
    makes the KL estimate biased (often negative) from the first step.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
