"""Value checks of one stage's config that need more than an Enum or a type: sizes that must divide, counts that
must be positive, eval's systems. validate.py runs them before the run directory is touched; the recipes call the
ones whose results they use (PPO's derived sizes, eval's ready systems), so a check and its use never drift.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignlab import distributed, models
from alignlab.errors import ConfigError

log = logging.getLogger("alignlab.eval")

DECODINGS = (
    "sample",
    "greedy",
    "best_of_n",
    "args",
    "blockwise",
)  # stage.systems.<name>.decoding (eval; systems is an untyped dict)
GUIDED = ("best_of_n", "args", "blockwise")  # decodings that read the reward= model


def ppo_sizes(s: DictConfig, world: int) -> tuple[int, int, int]:
    """(episodes per rank per iteration, minibatches per epoch, micro-batches per minibatch), or a ConfigError."""
    if s.rollout_batch_size < 1 or s.minibatch_size < 1:
        raise ConfigError(
            f"stage.rollout_batch_size={s.rollout_batch_size} and stage.minibatch_size={s.minibatch_size} must be >= 1"
        )
    if s.rollout_batch_size % world:
        raise ConfigError(
            f"stage.rollout_batch_size={s.rollout_batch_size} must be a multiple of world size {world}"
        )
    if s.rollout_batch_size % s.minibatch_size:
        raise ConfigError(
            f"stage.rollout_batch_size={s.rollout_batch_size} must be a multiple of stage.minibatch_size="
            f"{s.minibatch_size}"
        )
    accum = distributed.grad_accum_steps(
        s.minibatch_size, s.micro_batch_size, world, names=("stage.minibatch_size", "stage.micro_batch_size")
    )
    if s.ppo_epochs < 1 or s.iterations < 1:
        raise ConfigError("stage.ppo_epochs and stage.iterations must be >= 1")
    if s.group_size < 1 or (s.advantage != "gae" and s.group_size < 2):
        raise ConfigError(
            f"stage.group_size={s.group_size}: stage.advantage={s.advantage} needs >= 2 samples per prompt"
            if s.group_size >= 1
            else f"stage.group_size={s.group_size} must be >= 1"
        )
    if (s.rollout_batch_size // world) % s.group_size:
        raise ConfigError(
            f"stage.rollout_batch_size={s.rollout_batch_size} on {world} rank(s) is {s.rollout_batch_size // world}"
            f" episodes per rank, not whole groups of stage.group_size={s.group_size} (a prompt's K samples stay on"
            " one rank): make rollout_batch_size a multiple of group_size x ranks"
        )
    if s.whiten_rewards and s.rollout_batch_size // world < 8:
        raise ConfigError(
            "stage.whiten_rewards=true needs >= 8 episodes per rank (whitening tiny batches is noise)"
        )
    return s.rollout_batch_size // world, s.rollout_batch_size // s.minibatch_size, accum


def dpo_loss_terms(loss: str, sft_weight: float) -> dict:
    """stage=dpo's TRL loss_type / loss_weights: the preference loss, plus the chosen answer's mean token NLL
    weighted sft_weight (RPO, Pang et al. 2024) when that is above 0; a ConfigError below 0."""
    if sft_weight < 0:
        raise ConfigError(f"stage.sft_weight={sft_weight} must be >= 0 (0: the preference loss alone)")
    if sft_weight == 0:
        return {"loss_type": [loss], "loss_weights": None}
    return {"loss_type": [loss, "sft"], "loss_weights": [1.0, sft_weight]}


def check_rejection_sampling(s: DictConfig) -> None:
    """Rejection sampling's counts and temperatures (its choice fields are Enums, checked at compose)."""
    if s.iterations < 1 or s.samples_per_prompt < 1 or s.prompts_per_iteration < 1:
        raise ConfigError(
            "stage.iterations, stage.samples_per_prompt and stage.prompts_per_iteration must be >= 1"
        )
    if not s.temperatures or any(t <= 0 for t in s.temperatures):
        raise ConfigError(f"stage.temperatures={list(s.temperatures)} must list one or more temperatures > 0")


def eval_systems(s: DictConfig) -> dict[str, DictConfig]:
    """Eval's systems that can run (missing inputs skipped with a warning when skip_missing), or a clear error."""
    from alignlab.config import SystemConfig  # the schema module registers with Hydra: import it only here

    ready = {}
    for name, raw in s.systems.items():
        try:  # unset fields take SystemConfig's defaults; wrong keys or types fail here, naming the system
            # ${paths.runs} resolves against the run's config
            fields = OmegaConf.to_container(raw, resolve=True)
            sys_cfg = OmegaConf.merge(OmegaConf.structured(SystemConfig), fields)
        except Exception as e:
            raise ConfigError(f"stage.systems.{name}: {e}") from None
        if (sys_cfg.model is None) == (sys_cfg.answers is None):
            raise ConfigError(f"stage.systems.{name}: set exactly one of model= or answers=")
        if sys_cfg.model is not None and sys_cfg.decoding not in DECODINGS:
            raise ConfigError(
                f"stage.systems.{name}.decoding={sys_cfg.decoding!r}; choose one of {', '.join(DECODINGS)}"
            )
        path = sys_cfg.answers or sys_cfg.model
        if models.looks_local(path) and not Path(path).exists():
            if not s.skip_missing:
                raise FileNotFoundError(f"stage.systems.{name}: {path} does not exist (run its stage first)")
            log.warning("skipping system %s: %s does not exist (run its stage first)", name, path)
            continue
        ready[name] = sys_cfg
    if not ready:
        raise ConfigError("no system to evaluate: every model / answers file of stage.systems is missing")
    return ready
