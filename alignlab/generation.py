"""Batched sampling with KV cache (HF generate), EOS truncation, stop strings; next-token option scoring."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from alignlab.tensors import pad_sequences
from alignlab.tensors import position_ids as real_positions

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
    tokens: list[int] | None = None,
) -> list[str]:
    """Pure ancestral sampling (top_k=0, top_p=1) at `temperature` (0 = greedy); returns decoded answers.

    Prompts are rendered in the model's chat format and tokenized as every stage does (data/examples.py); an
    answer ends at the EOS (a chat template's end-of-turn token) or a stop string. tokens: if given, gets each
    answer's prompt + generated tokens (its EOS included), the positions the model computed with its KV cache.
    """
    from alignlab.data.examples import decode_answer, prompt_ids

    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_sequences(
            [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]], pad, "left"
        )
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        for n_prompt, row in zip(mask.sum(1).tolist(), gen[:, ids.shape[1] :].tolist(), strict=True):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
                if tokens is not None:
                    tokens.append(n_prompt + len(row) + 1)
            elif tokens is not None:
                tokens.append(n_prompt + len(row))
            out.append(cut_at_stop(decode_answer(tokenizer, row), stop_strings))
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


class _BufferLayer(DynamicLayer):
    """One layer's KV cache in a buffer allocated once for the whole rollout (prompt + max_new_tokens).

    HF's DynamicLayer concatenates every step (a full copy of the cache per token: most of a decoding step's time
    on a small model); this writes the new keys/values in place and hands attention a view of the filled part,
    so the attention inputs, and therefore the logits, are the same numbers.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.filled = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.key_buffer = key_states.new_empty(b, h, self.capacity, d)
        self.value_buffer = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, end = self.filled, self.filled + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV buffer of {self.capacity} positions overflows at {end}")
        self.key_buffer[:, :, n:end] = key_states
        self.value_buffer[:, :, n:end] = value_states
        self.filled = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.filled

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self.keys = self.key_buffer[:, :, : self.filled]
            self.values = self.value_buffer[:, :, : self.filled]


def _rollout_cache(model, capacity: int) -> Cache | None:
    """A preallocated KV cache when every layer is plain full attention (Llama-style models); None (HF's own
    dynamic cache) for sliding-window, chunked, shared-KV or recurrent layers, whose caches HF shapes itself."""
    try:
        config = model.config.get_text_config(decoder=True)
        types, _ = get_layer_types_and_kwargs(config)
    except Exception:  # noqa: BLE001 - an unusual config: HF's default cache is always correct
        return None
    if not types or any(t != "full_attention" for t in types):
        return None
    return Cache(layers=[_BufferLayer(capacity) for _ in types])


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    sampler: str = "inverse_cdf",
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature): [B, V] -> [B].

    inverse_cdf: one uniform per row (`uniform` [B, 1] in [0, 1), drawn here if None) against the cumulative
    distribution: exact for the categorical, one random number per row. multinomial: torch.multinomial, the draw
    HF generate makes (an exponential for each of the V entries of every row, a fifth of a small model's decoding
    step here): the same tokens as generate from the same seed.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if sampler == "multinomial":
        return torch.multinomial(probs, 1).squeeze(1)
    if sampler != "inverse_cdf":
        raise ValueError(f"sampler={sampler!r}: choose inverse_cdf or multinomial")
    cdf = probs.cumsum(-1)
    if uniform is None:
        uniform = torch.rand(len(cdf), 1, device=cdf.device)
    u = uniform.to(cdf.dtype) * cdf[:, -1:]  # < the row's total: never past the last token
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[-1] - 1)


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
    sampler: str = "inverse_cdf",
    compact: bool = True,
    return_logprobs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Sample responses to left-padded queries [B, L] with the KV cache: pure ancestral sampling from
    softmax(logits / temperature) (top_k=0, top_p=1), the distribution the log-probs are later computed from.

    A plain loop over the model's forward, not HF generate: no logits processors, so nothing from the model's
    generation_config (repetition_penalty, suppress_tokens, ...) reshapes the distribution, and none of
    generate's per-step bookkeeping. Faster than generate (scripts/bench/bench_rollout.py, docs/benchmarks.md):
    - the KV cache is allocated once and written in place (no per-step concatenation);
    - compact: rows that ended are dropped from the batch (and their cache) once a quarter of it has ended, so
      the long tail of a batch does not pay for the finished answers;
    - sampler="inverse_cdf" draws one uniform per row (see sample_token).
    With sampler="multinomial", compact=False it draws exactly the tokens HF generate draws from the same seed.
    Returns (response [B, T] padded after the first EOS, mask [B, T], ended_with_eos [B]); T <= max_new_tokens.
    synced_gpus: keep stepping until every rank is done (ZeRO-3, where each forward is collective); a rank whose
    rows have all ended keeps one in the batch.
    return_logprobs: also return each sampled token's log-prob [B, T] under softmax(logits / temperature), from the
    sampling pass's own logits (token_logprobs' formula; 0 on padding): PPO's old log-probs without another
    forward, equal to a full forward's up to the rounding of cached vs uncached attention.
    """
    if temperature <= 0:
        raise ValueError("RL rollouts sample; temperature must be > 0 (greedy rollouts do not explore)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; a rollout needs at least one new token")
    batch, device = len(query), query.device
    past = _rollout_cache(model, query.shape[1] + max_new_tokens)
    compact = compact and past is not None
    # The attention mask is a view of one buffer too (position n is written as the token is fed).
    mask_buffer = query_mask.new_ones(batch, query.shape[1] + max_new_tokens, dtype=torch.long)
    mask_buffer[:, : query.shape[1]] = query_mask
    filled = query.shape[1]
    position_ids = real_positions(query_mask)
    rows = torch.arange(batch, device=device)  # original row of each row still in the batch
    input_ids = query
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # per row still in the batch
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(batch, max_new_tokens, device=device) if return_logprobs else None
    steps = 0
    for step in range(max_new_tokens):
        out = model(
            input_ids=input_ids,
            attention_mask=mask_buffer[:, :filled],
            position_ids=position_ids,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        # One uniform per original row every step, whichever rows are still in the batch: compacting changes
        # no row's draws (the same tokens as compact=False, up to float rounding of a smaller batch's matmuls).
        uniform = torch.rand(batch, 1, device=device)[rows] if sampler == "inverse_cdf" else None
        token = sample_token(out.logits[:, -1], temperature, sampler, uniform).masked_fill(done, pad_id)
        tokens[rows, step] = token
        if logps is not None:
            logps[rows, step] = token_logprobs(out.logits[:, -1:], token[:, None], temperature)[:, 0]
        steps = step + 1
        done = done | (token == eos_id)
        if _all_done(done, synced_gpus) or steps == max_new_tokens:
            break
        input_ids, filled = token[:, None], filled + 1
        position_ids = position_ids[:, -1:] + 1
        n_done = int(done.sum())
        if compact and n_done * 4 >= len(done) and n_done < len(done):
            keep = (~done).nonzero().squeeze(1)
            past.batch_select_indices(keep)
            rows, done, input_ids = rows[keep], done[keep], input_ids[keep]
            position_ids, mask_buffer = position_ids[keep], mask_buffer[keep]
    response, response_mask = truncate_after_eos(tokens[:, :steps], eos_id, pad_id)
    ended = ((response == eos_id) & response_mask.bool()).any(1)
    if logps is not None:
        return response, response_mask, ended, logps[:, :steps] * response_mask
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
