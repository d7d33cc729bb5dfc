"""Choice fields are Enums (alignlab/choices.py): a value outside the set fails when Hydra composes the config, with
a message naming the key and the choices; and the config a run writes (config.yaml, done.json, a checkpoint's
manifest) holds the same plain strings as when these fields were `str`."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from alignlab import choices
from alignlab.config import Config
from alignlab.stages import STAGES
from tests.config.test_compose import compose_cfg

# (stage, key, a bad value, the choices the message lists): every Enum field of the schema
BAD_CHOICES = [
    ("sft", "resume", "always", "never, auto"),
    ("sft", "model.dtype", "fp8", "float32, bfloat16, float16, auto"),
    ("sft", "data.format", "csv", "hh, prompt_completion, preference, messages, text"),
    ("sft", "data.on_malformed", "ignore", "error, skip"),
    ("sft", "data.chat_template", "chatml", "auto, hh, none"),
    ("sft", "launcher.name", "mpi", "local, deepspeed, torchrun"),
    ("sft", "logger.name", "tensorboard", "jsonl, wandb"),
    ("sft", "logger.mode", "sometimes", "online, offline, disabled"),
    ("ppo", "reward.kind", "triple", "single, llama2"),
    ("sft", "stage.train_on", "bogus", "last_turn, all_assistant_turns"),
    ("rm", "stage.ranking", "listwise", "pairwise, kway"),
    ("rm", "stage.subset", "harmless", "all, helpful, safety"),
    ("rm", "stage.margin", "huge", "none, small, large"),
    ("dpo", "stage.loss", "hinge", "sigmoid, ipo"),
    ("dpo", "stage.subset", "harmless", "all, helpful, safety"),
    ("ppo", "stage.kl_estimator", "k2", "k1, k3"),
    ("ppo_ptx", "stage.kl_controller", "pid", "fixed, adaptive"),
    ("grpo", "stage.advantage", "vtrace", "gae, grpo, rloo"),
    ("rloo", "stage.kl_penalty", "both", "reward, loss"),
    ("ppo", "stage.missing_eos", "ignore", "none, replace, subtract"),
    ("rejection_sampling", "stage.missing_eos", "ignore", "none, replace, subtract"),
    ("ppo", "stage.old_logprobs", "cached", "forward, sampling"),
    ("rejection_sampling", "stage.keep", "best", "all, last"),
    ("rejection_sampling", "stage.train_from", "scratch", "start, previous"),
    ("rejection_sampling", "stage.truncated", "cut", "drop, keep"),
    ("rejection_sampling", "stage.finetune.train_on", "every_turn", "last_turn, all_assistant_turns"),
    ("context_distillation", "stage.truncated", "cut", "drop, keep"),
    ("context_distillation", "stage.finetune.train_on", "every_turn", "last_turn, all_assistant_turns"),
    ("rain", "stage.commit", "best", "argmax, sample"),
    ("rain", "stage.evaluator", "oracle", "self, reward_model"),
    ("rain", "stage.embedder", "bert", "lm, sentence_transformers"),
    ("rain", "stage.prompt_format", "chat", "prompt, hh"),
    ("rain", "stage.child_order", "random", "probability, token_id"),
    ("rain", "stage.eos_rule", "ignore", "stop, continue"),
    ("eval", "stage.judge", "gpt4", "oracle, rm, template"),
]


@pytest.mark.parametrize("stage,key,value,names", BAD_CHOICES, ids=[f"{s}:{k}" for s, k, *_ in BAD_CHOICES])
def test_a_bad_choice_fails_at_compose_naming_key_and_choices(stage, key, value, names):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(f"stage={stage}", f"{key}={value}")
    message = f"{e.value}\n{e.value.__cause__}"
    assert f"Invalid value '{value}', expected one of [{names}]" in message
    assert f"full_key: {key}" in message


def enum_fields(cls: type, prefix: str) -> dict[str, type]:
    """key -> Enum type of every choice field under a dataclass (nested dataclasses included)."""
    out = {}
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        t = next((a for a in typing.get_args(t) if a is not type(None)), t)  # X | None -> X
        if dataclasses.is_dataclass(t):
            out |= enum_fields(t, f"{prefix}{f.name}.")
        elif isinstance(t, type) and issubclass(t, choices.Choice):
            out[f"{prefix}{f.name}"] = t
    return out


def schema_enum_fields() -> dict[str, type]:
    """key -> Enum type of every choice field: the groups' and every stage's."""
    found = enum_fields(Config, "")  # resume, model.*, data.*, launcher.*, logger.*, reward.* (stage: Any)
    for s in STAGES:
        found |= enum_fields(OmegaConf.get_type(compose_cfg(f"stage={s}").stage), "stage.")
    return found


def test_every_enum_field_has_a_bad_value_row():
    assert set(schema_enum_fields()) == {key for _, key, _, _ in BAD_CHOICES}


def test_members_are_their_names():
    # OmegaConf writes an Enum by its member name and Hydra parses one by name: a name must be its value
    for enum_type in set(schema_enum_fields().values()):
        assert all(m.name == m.value for m in enum_type), enum_type


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_what_a_run_writes_holds_plain_strings(stage):
    cfg = compose_cfg(f"stage={stage}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # done.json and a checkpoint's manifest: json of the resolved config
    assert json.loads(json.dumps(resolved)) == resolved
    assert '"resume": "never"' in json.dumps(resolved) and '"dtype": "float32"' in json.dumps(resolved)
    # config.yaml: OmegaConf's YAML of it, read back as plain strings
    text = OmegaConf.to_yaml(resolved)
    assert "resume: never" in text and "!!python" not in text
    assert OmegaConf.to_container(OmegaConf.create(text)) == json.loads(json.dumps(resolved))


def test_a_choice_compares_formats_and_keys_as_its_string():
    s = compose_cfg("stage=ppo", "stage.kl_estimator=k3").stage
    assert s.kl_estimator == "k3" and f"{s.kl_estimator}" == "k3" and str(s.kl_estimator) == "k3"
    assert {"k3": 1}[s.kl_estimator] == 1 and json.dumps(s.kl_estimator) == '"k3"'


def test_the_sets_agree_with_the_modules_that_act_on_them():
    """Where a module keeps its own set (rl/ imports only torch and rl/; the others predate the Enums and can
    take theirs from alignlab/choices.py), it is the Enum's."""
    from alignlab import distributed, launch, models, scoring, tracking
    from alignlab.data import chat, examples, formats
    from alignlab.data.preferences import SUBSETS
    from alignlab.rl import kl, ranking, selection

    def values(enum_type) -> tuple:
        return tuple(m.value for m in enum_type)

    assert values(choices.DType) == (*models.DTYPES, "auto")
    assert values(choices.SourceFormat) == tuple(formats.SOURCE_FORMATS)
    assert values(choices.OnMalformed) == formats.ON_MALFORMED
    assert values(choices.ChatTemplate) == chat.CHAT_TEMPLATES
    assert values(choices.Launcher) == launch.LAUNCHERS
    assert values(choices.Logger) == tracking.LOGGERS
    assert values(choices.WandbMode) == tracking.WANDB_MODES
    assert values(choices.RewardKind) == scoring.KINDS
    assert values(choices.TrainOn) == examples.TRAIN_ON
    assert values(choices.Subset) == tuple(SUBSETS)
    assert values(choices.Ranking) == ranking.RANKINGS
    assert values(choices.Margin) == tuple(ranking.MARGINS)
    assert values(choices.KLEstimator) == kl.ESTIMATORS
    assert values(choices.KLController) == kl.CONTROLLERS
    assert values(choices.MissingEOS) == kl.MISSING_EOS
    assert values(choices.Truncated) == selection.TRUNCATED
    assert distributed.ZERO_STAGES  # an int set: validate.py checks it
