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
