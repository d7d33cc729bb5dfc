"""Is this a TinyHH model? TinyHH's data, prompts and oracle are refused to any other model unless asked for.

data=tinyhh is the default, so a user who brings a model and forgets data= would otherwise fine-tune it on TinyHH
and judge it with TinyHH's oracle without a word. A TinyHH model is one whose tokenizer is TinyHH's: stage=pretrain
from scratch builds the model around the tokenizer alignlab/tinyhh/emitters.py trains on the world's text, and
every later stage saves that tokenizer beside its model. The test reads `<model>/tokenizer.json` only (no model,
no transformers) and compares its vocabulary with TinyHH's tokenizer for data.tinyhh: tokenizers of TinyHH's
world share over 90% of their tokens whatever the sizes or seed (the vocabulary is learned from the sampled
text), one trained the same way on other English text under 30%, a real model's (Pythia, Llama, GPT-2) a few
percent. A hub name is never TinyHH's (TinyHH models are local directories).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignlab.errors import ConfigError

# Shared share of the two vocabularies (Jaccard) from which a tokenizer is TinyHH's (measured: TinyHH sizes and
# seeds 0.90-0.96; a TinyHH-style BPE trained on other English text 0.29)
MIN_OVERLAP = 0.75


def vocabulary(tokenizer_json: Path) -> set[str]:
    """The tokens of a saved fast tokenizer (BPE / WordPiece vocab dict, Unigram piece list, added tokens)."""
    data = json.loads(tokenizer_json.read_text())
    vocab = data.get("model", {}).get("vocab") or {}
    tokens = set(vocab) if isinstance(vocab, dict) else {str(v[0]) for v in vocab}
    return tokens | {t["content"] for t in data.get("added_tokens") or []}


def tinyhh_vocabulary(cache_dir: str | Path, tinyhh: dict) -> set[str]:
    """The vocabulary of TinyHH's tokenizer for these data.tinyhh sizes: from the data cache when generated, else
    trained in memory (a second or two; nothing is written)."""
    from alignlab.tinyhh.emitters import Sizes, build_rows

    sizes = Sizes(**tinyhh)
    cached = Path(cache_dir) / f"tinyhh-{sizes.key()}"
    if (cached / "manifest.json").exists():
        return vocabulary(cached / "tokenizer" / "tokenizer.json")
    from alignlab.tinyhh.tokenizer import build_tokenizer, tokenizer_training_text

    tok = build_tokenizer(tokenizer_training_text(build_rows(sizes)), vocab_size=sizes.vocab_size)
    return set(tok.get_vocab())


def is_tinyhh_tokenizer(path: str | Path, reference: set[str]) -> bool:
    """Whether the tokenizer saved in directory `path` is TinyHH's (see the module docstring)."""
    saved = Path(path).expanduser() / "tokenizer.json"
    if not saved.is_file():
        return False
    tokens = vocabulary(saved)
    return len(tokens & reference) >= MIN_OVERLAP * len(tokens | reference)


def models_on_tinyhh(cfg: DictConfig, recipe: str) -> tuple[str, list[tuple[str, str]]]:
    """(what makes the run TinyHH's, [(key, path)] of the models that meet it); ("", []) when nothing does."""
    from alignlab.stage_inputs import reward_models, stage_models

    s = cfg.stage
    if recipe in ("pretrain", "sft", "rm", "ppo", "rejection_sampling", "context_distillation"):
        if cfg.data.source != "tinyhh":
            return "", []
        return "data.source=tinyhh (data=tinyhh is the default)", stage_models(cfg, recipe)
    if recipe == "rain" and s.prompts == "tinyhh":
        return "stage.prompts=tinyhh (TinyHH's prompts and oracle)", stage_models(cfg, recipe)
    if recipe == "eval" and (s.prompts == "tinyhh" or s.judge == "oracle"):
        what = "stage.prompts=tinyhh" if s.prompts == "tinyhh" else ""
        what = " and ".join(w for w in (what, "stage.judge=oracle" if s.judge == "oracle" else "") if w)
        systems = OmegaConf.to_container(s.systems, resolve=True)
        found = [
            (f"stage.systems.{name}.model", sys["model"]) for name, sys in systems.items() if sys.get("model")
        ]
        found += stage_models(cfg, recipe)  # the judge model of judge=template
        if s.judge == "rm" or s.rm_score:
            found += reward_models(cfg)
        found.append(("stage.reference", s.reference))
        return what, found
    return "", []


def check_tinyhh_models(cfg: DictConfig, recipe: str) -> None:
    """A ConfigError naming every model of this stage that is not TinyHH's but would meet TinyHH's data, prompts or
    oracle, unless data.tinyhh_any_model=true. Models not there yet are left to the missing-input checks."""
    from alignlab import models

    what, found = models_on_tinyhh(cfg, recipe)
    if cfg.data.tinyhh_any_model or not found:
        return
    reference: set[str] | None = None
    foreign = []
    for key, path in found:
        local = models.looks_local(path)
        if local and not Path(path).expanduser().exists():
            continue  # a missing input: reported by check_inputs, or skipped by eval's skip_missing
        if local and reference is None:
            reference = tinyhh_vocabulary(cfg.data.cache_dir, OmegaConf.to_container(cfg.data.tinyhh))
        if not local or not is_tinyhh_tokenizer(path, reference):
            foreign.append(f"{key}={path}")
    if not foreign:
        return
    if recipe in ("rain", "eval"):
        fix = "pass stage.prompts=<file or hub dataset with a `prompt` column>"
        fix += " and stage.judge=rm or template" if recipe == "eval" else ""
    else:
        fix = "pass data=local data.source=<file> data.format=<format>, or data=hh_rlhf"
    raise ConfigError(
        f"{' and '.join(foreign)}: not a TinyHH model (its tokenizer is not TinyHH's) but {what}: {fix}; to run "
        "TinyHH's data on this model on purpose set data.tinyhh_any_model=true"
    )
