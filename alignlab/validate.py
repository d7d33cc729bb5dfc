"""Every key and value of a stage's config, checked before anything in its run directory is touched.

run_stage (alignlab/recipes/__init__.py) calls check() first, and `python -m alignlab` calls it before a launcher
relaunches the command on N processes, so a bad value never deletes or overwrites a finished run's files
(done.json, checkpoints/, config.yaml). Hydra has already rejected unknown keys, wrong types and a value outside
a choice field's set (the Enums of alignlab/choices.py); this adds what a type cannot say: a value outside a set
that is open or decided elsewhere (transformers' schedulers, ZeRO stages, TinyHH's prompt sets, pipeline stages),
batch arithmetic that cannot work, settings that contradict, missing inputs, and a model that is not TinyHH's
meeting TinyHH's data (alignlab/tinyhh/recognise.py). Each set is imported from where it is decided.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from alignlab import stage_checks
from alignlab.errors import AlignlabError, ConfigError, MissingInputError
from alignlab.stage_inputs import stage_models


def check(cfg: DictConfig, stage: str, *, world_size: int) -> None:
    """Raise a ConfigError listing every bad value of this stage's config (MissingInputError for a missing model);
    `stage` is the stage= option, world_size the number of processes that will run it."""
    from alignlab.stages import recipe_of
    from alignlab.tinyhh.recognise import check_tinyhh_models

    recipe = recipe_of(stage)
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
    """key -> its choices, for the keys every stage has and those of `recipe` whose set is not an Enum's (eval's
    stage.systems.<name>.decoding: stage_checks.eval_systems, which stage_problems calls)."""
    from alignlab import distributed

    table: dict[str, tuple] = {"deepspeed.zero_stage": distributed.ZERO_STAGES}
    s = cfg.stage
    if recipe in ("sft", "rm", "dpo"):
        table["stage.lr_scheduler"] = schedulers()
    if recipe in ("rejection_sampling", "context_distillation"):
        table["stage.finetune.lr_scheduler"] = schedulers()
    if recipe in ("rain", "eval") and s.prompts == "tinyhh":
        from alignlab.evaluation.tinyhh import PROMPT_SETS

        table.update({f"stage.prompt_sets[{i}]": PROMPT_SETS for i in range(len(s.prompt_sets))})
    if recipe == "pipeline":
        from alignlab.stages import PIPELINE_STAGES

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
    if recipe in ("pretrain", "sft", "rm", "dpo"):
        expect(distributed.grad_accum_steps, s.batch_size, s.micro_batch_size, world)
    if recipe in ("rejection_sampling", "context_distillation"):
        f = s.finetune
        names = ("stage.finetune.batch_size", "stage.finetune.micro_batch_size")
        expect(distributed.grad_accum_steps, f.batch_size, f.micro_batch_size, world, names=names)
    if (
        cfg.data.source == "tinyhh"
    ):  # the held-out split's counts (data.tinyhh.heldout_*), before any data work
        from alignlab.tinyhh.emitters import check_split

        expect(check_split, cfg.data.tinyhh)
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
        expect(stage_checks.ppo_sizes, s, world)
        if s.kl_controller == "adaptive" and (s.kl_target <= 0 or s.kl_horizon <= 0):
            problems.append(
                f"stage.kl_controller=adaptive needs stage.kl_target > 0 and stage.kl_horizon > 0 "
                f"(got {s.kl_target}, {s.kl_horizon})"
            )
        if s.ptx_coef and not s.ptx_source and cfg.data.source != "tinyhh":
            problems.append(
                f"stage.ptx_coef={s.ptx_coef} needs stage.ptx_source=<text dataset> (data is not TinyHH)"
            )
    if recipe == "dpo":
        expect(stage_checks.dpo_loss_terms, str(s.loss), s.sft_weight)
    if recipe == "rejection_sampling":
        expect(stage_checks.check_rejection_sampling, s)
    if recipe == "eval":
        with quiet("alignlab.eval"):  # its "skipping system" warnings are the recipe's to say, once
            try:
                expect(stage_checks.eval_systems, s)
            except FileNotFoundError as e:
                raise MissingInputError(str(e)) from None
    if recipe == "pipeline":
        from alignlab.stages import PIPELINE_STAGES

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
