"""The models a stage loads, by the key that names each: what validate.py requires to exist before a stage starts
and what tinyhh/recognise.py checks against TinyHH's data. Plain functions of the composed config; imports nothing
of alignlab's (so both can import it without a cycle)."""

from __future__ import annotations

from omegaconf import DictConfig


def reward_models(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, path) of the reward= models PPO and rejection sampling score with."""
    r = cfg.reward
    if r.kind == "single":
        return [("reward.reward_model", r.reward_model)]
    return [("reward.helpful_model", r.helpful_model), ("reward.safety_model", r.safety_model)]


def stage_models(cfg: DictConfig, recipe: str) -> list[tuple[str, str]]:
    """(key, path) of every model the stage loads that must exist before it starts (eval's systems: its own
    stage_checks.eval_systems, which skips missing ones under skip_missing)."""
    s = cfg.stage
    if recipe == "pretrain":
        return [] if s.from_scratch else [("model.name_or_path", cfg.model.name_or_path)]
    if recipe in ("sft", "rm", "dpo", "context_distillation", "rain", "ppo", "rejection_sampling"):
        out = [("stage.init_from", s.init_from)]
        if recipe == "ppo":
            critic = [("stage.value_from", s.value_from)] if s.advantage == "gae" else []
            out += [*critic, *reward_models(cfg)]
        if recipe == "rejection_sampling":
            out += reward_models(cfg)
        if recipe == "context_distillation" and s.gate:
            out.append(("stage.gate_model", s.gate_model))
        if recipe == "rain" and s.evaluator == "reward_model":
            out.append(("stage.reward_model", s.reward_model))
        return out
    if recipe == "eval" and s.judge == "template":
        return [("stage.judge_model", s.judge_model)]
    return []
