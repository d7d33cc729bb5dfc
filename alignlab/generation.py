"""Batched sampling with KV cache (HF generate), EOS truncation, stop strings; next-token option scoring."""

from __future__ import annotations

import torch

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


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) [B, L] with every sequence right-aligned: prompts end where generation starts."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def truncate_after_eos(response: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens after the first EOS become pad; returns (response [B, T], mask [B, T]: 1 up to and including EOS).

    A row without EOS keeps all T tokens (it ran out of budget; the caller penalises it).
    """
    is_eos = response == eos_id
    seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    mask = (~seen_before).long()
    return response.masked_fill(seen_before, pad_id), mask


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
    """Sample responses to left-padded queries [B, L] with the KV cache: pure ancestral sampling at `temperature`
    (top_k=0, top_p=1; the model's own generation_config is ignored, so nothing else reshapes the distribution
    that the log-probs are later computed from).

    Returns (response [B, T] padded after the first EOS, mask [B, T], ended_with_eos [B]); T <= max_new_tokens.
    synced_gpus: keep stepping until every rank is done (ZeRO-3, where each forward is collective).
    """
    from transformers import GenerationConfig

    if temperature <= 0:
        raise ValueError("RL rollouts sample; temperature must be > 0 (greedy rollouts do not explore)")
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    # transformers fills every unset field of `config` from the model's own generation_config (a checkpoint's
    # repetition_penalty, suppress_tokens, ...): hand it a blank one for this call.
    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the HF model
    saved, target.generation_config = target.generation_config, GenerationConfig()
    try:
        out = model.generate(
            input_ids=query, attention_mask=query_mask, generation_config=config, synced_gpus=synced_gpus
        )
    finally:
        target.generation_config = saved
    response = out[:, query.shape[1] :]
    if response.shape[1] == 0:
        response = torch.full((len(query), 1), eos_id, dtype=torch.long, device=query.device)
    response, mask = truncate_after_eos(response, eos_id, pad_id)
    ended = ((response == eos_id) & mask.bool()).any(1)
    return response, mask, ended


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_len: int):
    """Logits [B, T, V] predicting each response token of query+response input_ids [B, L] (response starts at
    context_len). Positions are counted over real tokens, so left padding of the query changes nothing."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits
    return logits[:, context_len - 1 : -1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at the sampled tokens: [B, T, V], [B, T] -> [B, T].

    The temperature divides the logits identically in rollout, reference and training log-probs; a mismatch
    makes the KL estimate biased (often negative) from the first step.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
