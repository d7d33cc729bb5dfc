"""Every key and value of a stage's config, checked before anything in its run directory is touched.

run_stage (alignlab/recipes/__init__.py) calls check() first, and `python -m alignlab` calls it before a launcher
relaunches the command on N processes, so a bad value never deletes or overwrites a finished run's files
(done.json, checkpoints/, config.yaml). Hydra has already rejected unknown keys and wrong types; this adds what a
type cannot say: a string outside its set of choices, batch arithmetic that cannot work, settings that contradict,
missing inputs, and a model that is not TinyHH's meeting TinyHH's data (alignlab/tinyhh/recognise.py). Each set of
choices is imported from the module that acts on it, never copied here.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from alignlab.errors import AlignlabError, ConfigError, MissingInputError


def check(cfg: DictConfig, stage: str, *, world_size: int) -> None:
    """Raise a ConfigError listing every bad value of this stage's config (MissingInputError for a missing model);
    `stage` is the stage= option, world_size the number of processes that will run it."""
    from alignlab.recipes import RECIPE_OF
    from alignlab.tinyhh.recognise import check_tinyhh_models

    recipe = RECIPE_OF.get(stage, stage)
    resolve(cfg)
    problems = [
        p for key, choices in choice_table(cfg, recipe).items() if (p := bad_choice(cfg, key, choices))
    ]
    problems += stage_problems(cfg, recipe, world_size)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} bad settings:\n  " + "\n  ".join(problems))
    check_inputs(cfg, recipe)
    check_tinyhh_models(cfg, recipe)


def resolve(cfg: DictConfig) -> None:
    """Every interpolation resolves and no mandatory value (???) is left unset."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is not set: pass {e.full_key}=... on the command line") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {e}") from None


def bad_choice(cfg: DictConfig, key: str, choices) -> str | None:
    """The problem with `key` when its value is not one of `choices` (absent keys are not this stage's)."""
    value = OmegaConf.select(cfg, key, default="<absent>")
    if value == "<absent>" or value in choices:
        return None
    if key.endswith("]"):  # a list entry: stage.prompt_sets[1]
        key = key[: key.rindex("[")]
    names = ", ".join("null" if c is None else str(c) for c in choices)
    return f"{key}={value!r} is not one of: {names}"


def choice_table(cfg: DictConfig, recipe: str) -> dict[str, tuple]:
    """key -> its choices, for the keys every stage has and those of `recipe`."""
    from alignlab import distributed, launch, models, scoring, tracking
    from alignlab.data import chat, formats
    from alignlab.recipes.common import RESUME

    table: dict[str, tuple] = {
        "resume": RESUME,
        "model.dtype": (*models.DTYPES, "auto"),
        "data.format": formats.SOURCE_FORMATS,
        "data.on_malformed": formats.ON_MALFORMED,
        "data.chat_template": chat.CHAT_TEMPLATES,
        "launcher.name": launch.LAUNCHERS,
        "logger.name": tracking.LOGGERS,
        "logger.mode": (None, *tracking.WANDB_MODES),
        "deepspeed.zero_stage": distributed.ZERO_STAGES,
        "reward.kind": scoring.KINDS,
    }
    s = cfg.stage
    if recipe in ("sft", "rm"):
        table["stage.lr_scheduler"] = schedulers()
    if recipe == "sft":
        from alignlab.data.examples import TRAIN_ON

        table["stage.train_on"] = TRAIN_ON
    if recipe in ("rejection_sampling", "context_distillation"):
        from alignlab.data.examples import TRAIN_ON
        from alignlab.rl.selection import TRUNCATED

        table.update({"stage.finetune.train_on": TRAIN_ON, "stage.finetune.lr_scheduler": schedulers()})
        if recipe == "context_distillation":  # rejection sampling's check_options checks its own
            table["stage.truncated"] = TRUNCATED
    if recipe == "rm":
        from alignlab.recipes.rm import SUBSETS
        from alignlab.rl.ranking import MARGINS, RANKINGS

        table.update(
            {"stage.ranking": RANKINGS, "stage.subset": tuple(SUBSETS), "stage.margin": tuple(MARGINS)}
        )
    if recipe in ("ppo", "rejection_sampling"):
        from alignlab.rl.kl import CONTROLLERS, MISSING_EOS

        table["stage.missing_eos"] = MISSING_EOS
        # kl_estimator: ppo's check_sizes; keep, train_from, truncated: rejection sampling's check_options; eval's
        # judge and systems: its check_systems (stage_problems calls all three)
        if recipe == "ppo":
            table["stage.kl_controller"] = CONTROLLERS
    if recipe == "rain":
        from alignlab.rain.stage_config import COMMITS, EMBEDDERS, EVALUATORS, PROMPT_FORMATS

        table.update(
            {
                "stage.commit": COMMITS,
                "stage.evaluator": EVALUATORS,
                "stage.embedder": EMBEDDERS,
                "stage.prompt_format": PROMPT_FORMATS,
            }
        )
    if recipe in ("rain", "eval") and s.prompts == "tinyhh":
        from alignlab.evaluation.tinyhh import PROMPT_SETS

        table.update({f"stage.prompt_sets[{i}]": PROMPT_SETS for i in range(len(s.prompt_sets))})
    if recipe == "pipeline":
        from alignlab.config import PIPELINE_STAGES

        table.update({f"stage.stages[{i}]": tuple(PIPELINE_STAGES) for i in range(len(s.stages))})
        table.update({f"stage.rerun[{i}]": tuple(PIPELINE_STAGES) for i in range(len(s.rerun))})
    return table


def schedulers() -> tuple[str, ...]:
    from transformers import SchedulerType

    return tuple(t.value for t in SchedulerType)


def stage_problems(cfg: DictConfig, recipe: str, world: int) -> list[str]:
    """The stage's own checks that need no model: batch arithmetic, contradicting settings."""
    from alignlab import distributed, models

    s, problems = cfg.stage, []

    def expect(call, *args, **kwargs) -> None:
        # a recipe's own check (one source for its rule); its ValueError becomes one problem in the list
        try:
            call(*args, **kwargs)
        except ValueError as e:  # ConfigError included
            problems.append(str(e))

    if cfg.launcher.nproc < 1:
        problems.append(f"launcher.nproc={cfg.launcher.nproc} must be >= 1")
    if cfg.deepspeed.offload_param and cfg.deepspeed.zero_stage != 3:
        problems.append("deepspeed.offload_param=true needs deepspeed.zero_stage=3")
    if cfg.keep_checkpoints < 1:
        problems.append(f"keep_checkpoints={cfg.keep_checkpoints} must be >= 1 (resume needs a checkpoint)")
    if recipe in ("pretrain", "sft", "rm"):
        expect(distributed.grad_accum_steps, s.batch_size, s.micro_batch_size, world)
    if recipe in ("rejection_sampling", "context_distillation"):
        f = s.finetune
        names = ("stage.finetune.batch_size", "stage.finetune.micro_batch_size")
        expect(distributed.grad_accum_steps, f.batch_size, f.micro_batch_size, world, names=names)
    own_model = Path(cfg.run_dir) / "model"
    if "init_from" in s and s.init_from and models.same_path(s.init_from, own_model) and recipe != "rain":
        problems.append(f"stage.init_from={s.init_from} is this run's own output; set run_dir= elsewhere")
    if recipe == "pretrain":
        tinyhh = cfg.data.source == "tinyhh"
        if s.from_scratch and not tinyhh and not cfg.model.tokenizer:
            problems.append(
                "stage.from_scratch=true on your own data needs model.tokenizer=<path or hub name>"
            )
        if s.from_scratch and cfg.model.lora.enabled:
            problems.append(
                "model.lora.enabled=true with stage.from_scratch=true: LoRA needs pretrained weights"
            )
        if s.from_scratch and s.seq_len > cfg.model.arch.max_position_embeddings:
            problems.append(
                f"stage.seq_len={s.seq_len} > model.arch.max_position_embeddings={cfg.model.arch.max_position_embeddings}"
            )
        if not s.from_scratch and models.same_path(cfg.model.name_or_path, own_model):
            problems.append(
                f"model.name_or_path={cfg.model.name_or_path} is this run's own output; continue from another "
                "run's model/ or set run_dir= (or experiment.name=) to write somewhere else"
            )
    if recipe == "ppo":
        from alignlab.recipes.ppo import check_sizes

        expect(check_sizes, s, world)
        if s.ptx_coef and not s.ptx_source and cfg.data.source != "tinyhh":
            problems.append(
                f"stage.ptx_coef={s.ptx_coef} needs stage.ptx_source=<text dataset> (data is not TinyHH)"
            )
    if recipe == "rejection_sampling":
        from alignlab.recipes.rejection_sampling import check_options

        expect(check_options, s)
    if recipe == "eval":
        from alignlab.recipes.eval import check_systems

        with quiet("alignlab.eval"):  # its "skipping system" warnings are the recipe's to say, once
            try:
                expect(check_systems, s)
            except FileNotFoundError as e:
                raise MissingInputError(str(e)) from None
    if recipe == "pipeline":
        from alignlab.config import PIPELINE_STAGES

        problems += [
            f"stage.overrides.{name}: {name!r} is not a pipeline stage; choose from {', '.join(PIPELINE_STAGES)}"
            for name in s.overrides
            if name not in PIPELINE_STAGES
        ]
    return problems


@contextlib.contextmanager
def quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def reward_models(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, path) of the reward= models PPO and rejection sampling score with."""
    r = cfg.reward
    if r.kind == "single":
        return [("reward.reward_model", r.reward_model)]
    return [("reward.helpful_model", r.helpful_model), ("reward.safety_model", r.safety_model)]


def stage_models(cfg: DictConfig, recipe: str) -> list[tuple[str, str]]:
    """(key, path) of every model the stage loads that must exist before it starts (eval's systems: its own
    check_systems, which skips missing ones under skip_missing)."""
    s = cfg.stage
    if recipe == "pretrain":
        return [] if s.from_scratch else [("model.name_or_path", cfg.model.name_or_path)]
    if recipe in ("sft", "rm", "context_distillation", "rain", "ppo", "rejection_sampling"):
        out = [("stage.init_from", s.init_from)]
        if recipe == "ppo":
            out += [("stage.value_from", s.value_from), *reward_models(cfg)]
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


def check_inputs(cfg: DictConfig, recipe: str) -> None:
    """A MissingInputError naming the stage to run first for a local model that is not there, or naming a local
    data file that is not there."""
    from alignlab import models
    from alignlab.data.loading import require_source

    if recipe != "pipeline" and cfg.data.source != "tinyhh":
        require_source(cfg.data.source)

    inputs = stage_models(cfg, recipe)
    if cfg.model.tokenizer and recipe != "pipeline":
        inputs.append(("model.tokenizer", cfg.model.tokenizer))
    for key, path in inputs:
        try:
            models.require_input(path, key)
        except AlignlabError:
            raise
        except FileNotFoundError as e:
            raise MissingInputError(str(e)) from None
