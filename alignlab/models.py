"""Loading and saving models and tokenizers: transformers Auto* classes from a local path or hub name, PEFT LoRA."""

from __future__ import annotations

import json
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

from alignlab.errors import ConfigError, MissingInputError
from alignlab.tensors import position_ids

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


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def in_hub_cache(name: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, or not even a valid repo id
        return False
    return True


def not_found(name_or_path: str, what: str, error: BaseException | None = None) -> MissingInputError:
    """A name that is neither a local directory nor a loadable hub repo: say both, naming the config key."""
    where = Path(name_or_path).expanduser().resolve()
    if hub_offline():
        why = "the hub is not reachable (HF_HUB_OFFLINE=1) and it is not in the local hub cache"
    elif error is not None and _repo_missing(error):
        why = "no such hub repo"
    else:
        why = f"the hub is not reachable ({str(error).strip().splitlines()[0] if error else 'offline'})"
    return MissingInputError(
        f"{what}={name_or_path}: no such local directory {where}, and {why}; fix the path (relative paths are "
        "read from the directory you run in) or the hub name"
    )


def _repo_missing(error: BaseException) -> bool:
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    while error is not None:
        if isinstance(
            error, (RepositoryNotFoundError, HFValidationError)
        ) or "not a valid model identifier" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def from_dir_or_hub(load, name_or_path: str, what: str, **kwargs):
    """load(name_or_path, **kwargs), a hub name that does not load reported as not_found (naming `what`)."""
    from huggingface_hub.errors import HFValidationError

    try:
        return load(name_or_path, **kwargs)
    except (OSError, HFValidationError) as e:
        if Path(name_or_path).expanduser().exists():
            raise
        raise not_found(name_or_path, what, e) from e


def require_input(name_or_path: str, what: str) -> None:
    """Fail fast, naming the stage to run first, when a local input a stage needs is not there (or, offline, a
    hub name that is not in the cache: a mistyped relative path reads as a hub id)."""
    if Path(name_or_path).expanduser().exists():
        return
    if not looks_local(name_or_path):
        if hub_offline() and not in_hub_cache(name_or_path):
            raise not_found(name_or_path, what)
        return
    hint = "point it at an existing directory or a hub name"
    m = re.search(r"([^/]+)/model/?$", name_or_path)
    if m:
        hint = f"run `python -m alignlab stage={m.group(1)}` first to create it, or {hint}"
    where = Path(name_or_path).expanduser().resolve()
    raise MissingInputError(f"{what}={name_or_path} does not exist (no such local directory {where}): {hint}")


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False, what: str = "model.tokenizer"
) -> PreTrainedTokenizerBase:
    require_input(name_or_path, what)
    tok = from_dir_or_hub(
        AutoTokenizer.from_pretrained, name_or_path, what, trust_remote_code=trust_remote_code
    )
    if tok.pad_token is None:
        # Many hub causal LMs ship without a pad token; pad == eos is safe only because our label masks keep the
        # answer-ending EOS (the project's RLHF spec, invariant 1).
        log.warning("tokenizer %s has no pad token; using eos %r as pad", name_or_path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    what: str = "model.name_or_path",
):
    """A causal LM from a hub name or directory. A LoRA stage's model/ is the merged model (its adapter alone is
    in model/adapter); a directory holding only an adapter (saved before that) loads base + merged adapter."""
    require_input(name_or_path, what)
    if Path(name_or_path).expanduser().exists():
        # Absolute, so a LoRA adapter saved from this model records a base path that works from any directory.
        name_or_path = str(Path(name_or_path).expanduser().resolve())
    if (Path(name_or_path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
        )
        return model.merge_and_unload()
    return from_dir_or_hub(
        AutoModelForCausalLM.from_pretrained,
        name_or_path,
        what,
        dtype=torch_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )


def load_reward_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
    what: str = "reward model",
):
    """AutoModelForSequenceClassification(num_labels=1): a trained reward model (a LoRA RM's model/ is merged, score
    head included), or a fresh score head on a causal LM's backbone (an SFT model, or an adapter-only directory
    saved before merged saves: a causal LM adapter merged into its base first, a SEQ_CLS one with its score head).

    The model reads its score at the last token that is not the pad id, so config.pad_token_id must be set: it is
    taken from pad_token_id, else from the model's config, else from the tokenizer saved next to the weights.
    """
    require_input(name_or_path, what)
    if Path(name_or_path).expanduser().exists():
        name_or_path = str(Path(name_or_path).expanduser().resolve())
    adapter_config = Path(name_or_path) / "adapter_config.json"
    if adapter_config.exists() and json.loads(adapter_config.read_text()).get("task_type") == "SEQ_CLS":
        from peft import PeftModel

        base = load_reward_model(
            json.loads(adapter_config.read_text())["base_model_name_or_path"],
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            pad_token_id=pad_token_id,
        )
        model = PeftModel.from_pretrained(base, name_or_path).merge_and_unload()
    elif adapter_config.exists():
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
        model = from_dir_or_hub(
            AutoModelForSequenceClassification.from_pretrained,
            name_or_path,
            what,
            num_labels=1,
            dtype=torch_dtype(dtype),
            trust_remote_code=trust_remote_code,
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


def llama_from_arch(tokenizer: PreTrainedTokenizerBase, arch, dtype: str = "float32") -> LlamaForCausalLM:
    """build_llama with model.arch's fields (stage=pretrain from scratch; the scale ladder's sizes)."""
    return build_llama(
        tokenizer,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        dtype=dtype,
    )


def lora_targets(target_modules) -> list[str] | str | None:
    """model.lora.target_modules as PEFT takes it: None (PEFT's default for the architecture), "all-linear", or a
    list of module names (a single other string is one name)."""
    if target_modules is None or target_modules == "all-linear":
        return target_modules
    if isinstance(target_modules, str):
        return [target_modules]
    names = list(target_modules)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"model.lora.target_modules={names!r}: give module names (a list), all-linear, or null for PEFT's "
            "default for the architecture"
        )
    return names


def apply_lora(
    model, *, r: int, alpha: int, dropout: float, target_modules=None, task_type: str = "CAUSAL_LM"
):
    """Wrap with a PEFT LoRA adapter; only adapter weights train (task_type SEQ_CLS also trains the score head).

    target_modules: None (PEFT's default for model.config.model_type), "all-linear" or a list of names.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        if "target" not in str(e).lower():
            raise
        linear = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or "Conv1D" in type(m).__name__
        ]
        leaf = sorted({n.rsplit(".", 1)[-1] for n in linear})
        asked = (
            targets
            if targets is not None
            else f"PEFT's default for model_type={model.config.model_type!r} (none)"
        )
        raise ConfigError(
            f"model.lora.target_modules={asked}: no module of {type(model).__name__} matches; its linear modules "
            f"are named {leaf[:8]} (set e.g. model.lora.target_modules=[{leaf[0] if leaf else 'name'}] or "
            "model.lora.target_modules=all-linear)"
        ) from e
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


def parameter_count(name_or_path: str, *, reward: bool = False, trust_remote_code: bool = False) -> int:
    """The parameters of a saved causal LM (reward: a reward model, one score output) from its config alone: the
    model is built on the meta device, so no weights are read (compute accounting of models not loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if reward:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return count_parameters(model)


def count_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    """The model's parameters (trainable: those that train); a ZeRO-3 partition counts whole (its ds_numel)."""
    return sum(
        getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable
    )


def token_values(value_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position scalar outputs [B, L] of a sequence-classification model (the PPO critic, initialised from the
    reward model): its score head applied to every hidden state instead of only the last non-pad one.

    Works through a PEFT wrapper (LoRA layers live inside the modules called here).
    """
    return score_head_forward(value_model, input_ids, attention_mask, position_ids(attention_mask))[0]


def score_head_forward(model, input_ids, attention_mask, positions, past_key_values=None, use_cache=False):
    """(the score head at every fed position [B, L], the KV cache or None): token_values, and with a cache the
    incremental form reward-guided decoding reads (scoring.PrefixScores)."""
    inner = model
    if hasattr(inner, "get_base_model"):  # PEFT -> the wrapped transformers model (adapters stay active)
        inner = inner.get_base_model()
    head = getattr(inner, "score", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no `score` head; it must be a reward-model class")
    out = getattr(inner, inner.base_model_prefix)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=past_key_values,
        use_cache=use_cache,
    )
    return head(out.last_hidden_state).squeeze(-1).float(), out.past_key_values if use_cache else None


class TokenValueModel(torch.nn.Module):
    """The PPO critic as one module (so a DeepSpeed engine wraps its forward): forward -> token values [B, L]."""

    def __init__(self, value_model):
        super().__init__()
        self.value_model = value_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_values(self.value_model, input_ids, attention_mask)
