"""The config's string options that have a fixed set of values, as Enums (alignlab/config.py types its fields with
them), so Hydra rejects any other value when it composes the config, naming the key and the choices, before
anything runs.

Each is a StrEnum whose member names are its values: a member compares, hashes, formats and JSON-encodes as its
plain string, and OmegaConf writes it as that string, so config.yaml, done.json and a recipe's `== "k1"` read as
they did when these were plain `str` fields. A leaf module (it imports only `enum`): a module that acts on a choice
can take its set of values from here. rl/ keeps its own (it imports only torch and rl/).
"""

from __future__ import annotations

from enum import StrEnum


class Choice(StrEnum):
    """The base of every choice below (functional form: `Choice(name, "value value ...")`, each value its own
    member name)."""


Resume = Choice("Resume", "never auto")  # resume=
DType = Choice("DType", "float32 bfloat16 float16 auto")  # model.dtype
SourceFormat = Choice("SourceFormat", "hh prompt_completion preference messages text")  # data.format
OnMalformed = Choice("OnMalformed", "error skip")  # data.on_malformed
ChatTemplate = Choice("ChatTemplate", "auto hh none")  # data.chat_template
Launcher = Choice("Launcher", "local deepspeed torchrun")  # launcher.name
Logger = Choice("Logger", "jsonl wandb")  # logger.name
WandbMode = Choice("WandbMode", "online offline disabled")  # logger.mode (or null)
RewardKind = Choice("RewardKind", "single llama2")  # reward.kind
TrainOn = Choice("TrainOn", "last_turn all_assistant_turns")  # stage.train_on, stage.finetune.train_on
Subset = Choice("Subset", "all helpful safety")  # stage.subset (rm)
Ranking = Choice("Ranking", "pairwise kway")  # stage.ranking (rm)
Margin = Choice("Margin", "none small large")  # stage.margin (rm)
DPOLoss = Choice("DPOLoss", "sigmoid ipo")  # stage.loss (dpo)
KLEstimator = Choice("KLEstimator", "k1 k3")  # stage.kl_estimator (ppo)
KLController = Choice("KLController", "fixed adaptive")  # stage.kl_controller (ppo)
# stage.advantage (ppo, grpo, rloo): a critic with GAE, or a group baseline over K samples per prompt
Advantage = Choice("Advantage", "gae grpo rloo")
KLPenalty = Choice("KLPenalty", "reward loss")  # stage.kl_penalty (ppo, grpo, rloo): where beta * KL enters
MissingEOS = Choice("MissingEOS", "none replace subtract")  # stage.missing_eos (ppo, rejection_sampling)
OldLogprobs = Choice("OldLogprobs", "forward sampling")  # stage.old_logprobs (ppo, grpo, rloo)
Keep = Choice("Keep", "all last")  # stage.keep (rejection_sampling)
TrainFrom = Choice("TrainFrom", "start previous")  # stage.train_from (rejection_sampling)
Truncated = Choice("Truncated", "drop keep")  # stage.truncated (rejection_sampling, context_distillation)
Judge = Choice("Judge", "oracle rm template")  # stage.judge (eval)
