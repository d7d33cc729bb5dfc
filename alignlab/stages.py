"""The stage registry: every `stage=` option and what the rest of alignlab needs to know about it, in one table.

config.py registers each stage's schema in Hydra's ConfigStore from it, run_stage picks the recipe and whether
the stage checkpoints, stage=pipeline reads the inputs (its dependency order), the costs (longest chain first) and
the demo budget, runs.py which stages score with the reward model, and docs/pipeline.md's stage table is printed
from it (`python -m alignlab.stages`, checked by tests/unit/test_stages.py). It imports nothing of alignlab's: a
schema is named by its import path and loaded by whoever registers it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    name: str  # the stage= option; also its default run directory name (stage.name)
    schema: str  # "module:Class", the stage's config dataclass
    recipe: str = ""  # the module under alignlab/recipes that runs it ("" = the stage's own name)
    preset: dict[str, Any] = field(default_factory=dict)  # schema defaults this stage changes (a preset)
    inputs: tuple[str, ...] = ()  # the stages whose outputs it reads under the default paths (stage_dir)
    # minutes with its defaults on TinyHH, 2 CPU cores: only for stage=pipeline to start the longest chain first
    cost: float = 0
    # saves resumable checkpoints and stops on SIGTERM/SIGUSR1/SIGUSR2 (docs/resume.md)
    resumable: bool = False
    uses_reward: bool = False  # scores with reward= (so reward.* decides its outputs: alignlab/runs.py)
    # only starts other stages: one process whatever launcher= says; not a pipeline stage
    orchestrator: bool = False
    # stage=pipeline's default stage.overrides.<name>: the demo budget (docs/pipeline.md)
    demo: tuple[str, ...] = ()
    # in stage=pipeline's default stage.stages (`make demo`); False: it runs when stage.stages names it
    in_demo: bool = True
    # (old key, new key): keys this stage's schema renamed, so an old command line is told the new name
    renamed: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not self.recipe:
            object.__setattr__(self, "recipe", self.name)

    def schema_node(self):
        """What config.py stores in Hydra's ConfigStore: the dataclass, or an instance of it for a preset."""
        module, _, cls = self.schema.partition(":")
        schema = getattr(importlib.import_module(module), cls)
        return schema(name=self.name, **self.preset) if self.preset else schema


# The demo budget (stage=pipeline's default stage.overrides, so that `make demo` fits in 20 minutes on 2 CPU
# cores): stage=eval judges every system once, so the training stages skip their own before/after oracle
# evaluation; RAIN's search (the costliest stage per prompt) and eval answer 100 prompts per set, the same
# prompts; PPO-ptx mixes 4 pretraining blocks (not 8) into each PPO micro-batch; rejection sampling samples 256
# prompts per iteration (not 512). Measured: docs/results.md, "The pipeline".
NO_OWN_EVAL = "stage.sample_eval=0"

# GRPO (Shao et al. 2024, DeepSeekMath §4.1): group-normalised outcome advantages, beta * KL (k3, their eq. 4) in
# the loss with beta 0.04, one update per rollout batch; RLOO (Ahmadian et al. 2024): leave-one-out baseline, the KL
# penalty in the reward as PPO's (TRL's RLOOTrainer: beta 0.05). K = 4 samples per prompt (RLOO's paper: k = 2, 4).
# Advantages are not whitened again over the batch (the group baseline is the normalisation).
GRPO_PRESET = {
    "advantage": "grpo",
    "group_size": 4,
    "kl_penalty": "loss",
    "kl_estimator": "k3",
    "kl_coef": 0.04,
    "ppo_epochs": 1,
    "whiten_advantages": False,
}
RLOO_PRESET = {
    "advantage": "rloo",
    "group_size": 4,
    "kl_penalty": "reward",
    "kl_estimator": "k1",
    "kl_coef": 0.05,
    "ppo_epochs": 1,
    "whiten_advantages": False,
}

# In the order a user reads them, which lists every stage after its inputs (stage=pipeline's dependency order).
STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("pretrain", "alignlab.config:PretrainConfig", cost=4, resumable=True,
                  renamed=(("stage.max_new_tokens", "stage.eval_max_new_tokens"),)),
        StageSpec("sft", "alignlab.config:SFTConfig", inputs=("pretrain",), cost=1, resumable=True,
                  demo=(NO_OWN_EVAL,), renamed=(("stage.max_new_tokens", "stage.eval_max_new_tokens"),)),
        StageSpec("rm", "alignlab.config:RMConfig", inputs=("sft",), cost=1, resumable=True,
                  renamed=(("stage.max_new_tokens", "stage.normalize_max_new_tokens"),)),
        # not in make demo: its 20 minutes on 2 cores leave no room; the full table names it in stage.stages
        StageSpec("dpo", "alignlab.config:DPOConfig", inputs=("sft",), cost=2, resumable=True,
                  demo=(NO_OWN_EVAL,), in_demo=False),
        StageSpec("ppo", "alignlab.config:PPOConfig", inputs=("sft", "rm"), cost=6, resumable=True,
                  uses_reward=True, demo=(NO_OWN_EVAL,)),
        # PPO-ptx: stage=ppo's recipe with the pretraining term on
        StageSpec("ppo_ptx", "alignlab.config:PPOConfig", recipe="ppo", preset={"ptx_coef": 1.0},
                  inputs=("sft", "rm"), cost=10, resumable=True, uses_reward=True,
                  demo=(NO_OWN_EVAL, "stage.ptx_micro_batch_size=4")),
        # critic-free online RL: stage=ppo's recipe with K samples per prompt and a group baseline, no critic;
        # not in make demo (its 20 minutes leave no room)
        StageSpec("grpo", "alignlab.config:PPOConfig", recipe="ppo", preset=GRPO_PRESET, inputs=("sft", "rm"),
                  cost=5, resumable=True, uses_reward=True, demo=(NO_OWN_EVAL,), in_demo=False),
        StageSpec("rloo", "alignlab.config:PPOConfig", recipe="ppo", preset=RLOO_PRESET, inputs=("sft", "rm"),
                  cost=5, resumable=True, uses_reward=True, demo=(NO_OWN_EVAL,), in_demo=False),
        StageSpec("rejection_sampling", "alignlab.config:RejectionSamplingConfig", inputs=("sft", "rm"), cost=3,
                  resumable=True, uses_reward=True, demo=(NO_OWN_EVAL, "stage.prompts_per_iteration=256")),
        StageSpec("context_distillation", "alignlab.config:ContextDistillationConfig", inputs=("sft", "rm"),
                  cost=1, resumable=True, demo=(NO_OWN_EVAL,), renamed=(("stage.prompts", "stage.n_prompts"),)),
        StageSpec("rain", "alignlab.rain.stage_config:RainConfig", inputs=("pretrain",), cost=6,
                  demo=("stage.n_prompts=100",)),
        # make demo leaves out the reward-guided decodings (the full table: docs/pipeline.md)
        StageSpec("eval", "alignlab.config:EvalConfig",
                  inputs=("pretrain", "sft", "rm", "dpo", "ppo", "ppo_ptx", "grpo", "rloo", "rejection_sampling",
                          "context_distillation", "rain"),
                  cost=2, uses_reward=True,
                  demo=("stage.n_prompts=100", "~stage.systems.sft_args", "~stage.systems.sft_blockwise")),
        StageSpec("pipeline", "alignlab.config:PipelineConfig", orchestrator=True),
    ]
}  # fmt: skip
# stage=pipeline's stages (every stage but the orchestrators), in the registry's order
PIPELINE_STAGES: tuple[str, ...] = tuple(s for s, spec in STAGES.items() if not spec.orchestrator)
# the ones it runs when stage.stages is not given (`make demo`)
DEMO_STAGES: tuple[str, ...] = tuple(s for s in PIPELINE_STAGES if STAGES[s].in_demo)


def recipe_of(stage: str) -> str:
    """The recipe module (alignlab/recipes/<recipe>.py) that runs the stage= option `stage`."""
    spec = STAGES.get(stage)
    return spec.recipe if spec else stage


def uses_reward(stage: str) -> bool:
    """Whether the stage scores with reward= (False for a name that is no stage= option, e.g. stage.name=rm_helpful)."""
    spec = STAGES.get(stage)
    return spec is not None and spec.uses_reward


def demo_budget() -> dict[str, list[str]]:
    """stage=pipeline's default stage.overrides: every pipeline stage's demo budget (possibly none)."""
    return {s: list(STAGES[s].demo) for s in PIPELINE_STAGES}


def renamed_key(stage: str, overrides: list[str]) -> str | None:
    """The message for the first override that sets a key `stage` has renamed (None when there is none)."""
    renamed = dict(STAGES[stage].renamed) if stage in STAGES else {}
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key in renamed:
            return f"{key} is now {renamed[key]} (stage={stage}): use {renamed[key]}={o.split('=', 1)[-1]}"
    return None


def stage_dir(run_name: str, *, _root_) -> str:
    """The `${stage_dir:<name>}` resolver: the run directory <paths.runs>/<experiment.name>/<name>, where a stage
    of this experiment writes by default; `${stage_dir:sft}/model` is the SFT model the later stages start from."""
    return f"{_root_.paths.runs}/{_root_.experiment.name}/{run_name}"


def stage_table() -> str:
    """stage=pipeline's stages as a markdown table (docs/pipeline.md holds a copy, kept true by a test)."""
    rows = [
        "| stage | recipe | reads | resumable | scores with reward= | minutes (TinyHH, 2 cores) | in make demo |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in PIPELINE_STAGES:
        spec = STAGES[s]
        rows.append(
            f"| {s} | {spec.recipe} | {', '.join(spec.inputs) or 'data only'} | {'yes' if spec.resumable else 'no'} "
            f"| {'yes' if spec.uses_reward else 'no'} | {spec.cost:g} | {'yes' if spec.in_demo else 'no'} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(stage_table())
