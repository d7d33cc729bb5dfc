"""Loading and saving models and tokenizers: transformers Auto* classes from a local path or hub name, PEFT LoRA."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

log = logging.getLogger("alignlab.models")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ValueError(
            f"model.dtype={name!r} is not supported; choose one of {', '.join([*DTYPES, 'auto'])}"
        )
    return DTYPES[name]


def looks_local(name_or_path: str) -> bool:
    """A hub id is "name" or "org/name"; anything deeper, absolute or relative-dotted is a local path."""
    return (
        Path(name_or_path).exists()
        or name_or_path.startswith(("/", "./", "../", "~"))
        or name_or_path.count("/") > 1
    )


def same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def require_input(name_or_path: str, what: str) -> None:
    """Fail fast, naming the stage to run first, when a local input a stage needs is not there."""
    if not looks_local(name_or_path) or Path(name_or_path).expanduser().exists():
        return
    hint = "point it at an existing directory or a hub name"
    m = re.search(r"([^/]+)/model/?$", name_or_path)
    if m:
        hint = f"run `python -m alignlab stage={m.group(1)}` first to create it, or {hint}"
    raise FileNotFoundError(f"{what}={name_or_path} does not exist: {hint}")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    require_input(name_or_path, "model.tokenizer")
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Many hub causal LMs ship without a pad token; pad == eos is safe only because our label masks keep the
        # answer-ending EOS (see specs/rlhf.md invariant 1).
        log.warning("tokenizer %s has no pad token; using eos %r as pad", name_or_path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", trust_remote_code: bool = False):
    """A causal LM from a hub name or directory; a directory holding a LoRA adapter loads base + merged adapter."""
    require_input(name_or_path, "model.name_or_path")
    if Path(name_or_path).expanduser().exists():
        # Absolute, so a LoRA adapter saved from this model records a base path that works from any directory.
        name_or_path = str(Path(name_or_path).expanduser().resolve())
    if (Path(name_or_path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
        )
        return model.merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
    )


def load_reward_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
):
    """AutoModelForSequenceClassification(num_labels=1): a trained reward model, or a fresh score head on a causal
    LM's backbone (an SFT model, or a LoRA adapter directory merged into its base first).

    The model reads its score at the last token that is not the pad id, so config.pad_token_id must be set: it is
    taken from pad_token_id, else from the model's config, else from the tokenizer saved next to the weights.
    """
    require_input(name_or_path, "reward model")
    if Path(name_or_path).expanduser().exists():
        name_or_path = str(Path(name_or_path).expanduser().resolve())
    if (Path(name_or_path) / "adapter_config.json").exists():
        causal = load_causal_lm(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        config = causal.config
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
        missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
        if any(not k.startswith("score.") for k in missing):
            raise ValueError(
                f"{name_or_path}: backbone weights {missing[:3]} did not map onto the reward model"
            )
        model = model.to(causal.dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
        )
    if pad_token_id is None and model.config.pad_token_id is None:
        pad_token_id = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code).pad_token_id
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def build_llama(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
) -> LlamaForCausalLM:
    """A freshly initialised Llama sized for the tokenizer (stage=pretrain from scratch)."""
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"model.arch.hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads}"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    dt = torch_dtype(dtype)
    return model.to(dt) if isinstance(dt, torch.dtype) else model


def apply_lora(
    model, *, r: int, alpha: int, dropout: float, target_modules: list[str], task_type: str = "CAUSAL_LM"
):
    """Wrap with a PEFT LoRA adapter; only adapter weights train (task_type SEQ_CLS also trains the score head)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type=task_type,
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d: %d of %d parameters train (%.2f%%)", r, trainable, total, 100 * trainable / total)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off for good (RL: log-probs of the rollout, the reference and training must be the same function).

    Zeroes every nn.Dropout and the config's *dropout / *_pdrop rates that attention kernels read functionally.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):  # rates copied from the config at init (attention)
            if (name.endswith("dropout") or name.endswith("_pdrop")) and isinstance(value, float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if (key.endswith("dropout") or key.endswith("_pdrop")) and isinstance(value, float):
                    setattr(config, key, 0.0)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def token_values(value_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position scalar outputs [B, L] of a sequence-classification model (the PPO critic, initialised from the
    reward model): its score head applied to every hidden state instead of only the last non-pad one.

    Works through a PEFT wrapper (LoRA layers live inside the modules called here).
    """
    inner = value_model
    if hasattr(inner, "get_base_model"):  # PEFT -> the wrapped transformers model (adapters stay active)
        inner = inner.get_base_model()
    backbone = getattr(inner, inner.base_model_prefix)
    head = getattr(inner, "score", None)
    if head is None:
        raise ValueError(
            f"{type(inner).__name__} has no `score` head; the critic must be a reward-model class"
        )
    from alignlab.rl.rewards import position_ids

    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return head(hidden).squeeze(-1).float()


class TokenValueModel(torch.nn.Module):
    """The PPO critic as one module (so a DeepSpeed engine wraps its forward): forward -> token values [B, L]."""

    def __init__(self, value_model):
        super().__init__()
        self.value_model = value_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_values(self.value_model, input_ids, attention_mask)
