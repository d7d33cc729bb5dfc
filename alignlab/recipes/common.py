"""What every recipe does first: process group, seeds, run directory with its resolved config.yaml, tracker."""

from __future__ import annotations

import logging
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from alignlab import checkpoint, distributed
from alignlab.checkpoint import PreemptionWatch, atomic_write_text
from alignlab.errors import ConfigError
from alignlab.tracking import Tracker

log = logging.getLogger("alignlab")

RESUME = ("never", "auto")  # resume: start fresh | the newest intact checkpoint made by the same config


@dataclass
class Run:
    env: distributed.DistEnv
    device: torch.device
    run_dir: Path
    tracker: Tracker
    config: dict = field(default_factory=dict)  # the resolved config (saved with every checkpoint)
    resume: Path | None = None  # resume=auto: the checkpoint this run continues from
    resume_step: int = 0  # ... and its step (0: a fresh run)
    keep_checkpoints: int = 2
    preemption: PreemptionWatch = field(default_factory=PreemptionWatch)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def stop_preempted(run: Run, step: int, path: Path) -> None:
    """After the checkpoint a scheduler's signal asked for: close the tracker and stop the stage (exit 75)."""
    run.tracker.close()
    raise checkpoint.Preempted(run.preemption.signum, step, path)


def step_boundary(run: Run, step: int, last: int, every: int, save: Callable[[int], Path], bar) -> None:
    """The end of an own-loop step (or PPO iteration) before the last: a checkpoint every `every` steps, and on a
    scheduler's signal (all ranks agree) a checkpoint, then the stage stops (exit 75)."""
    if step == last:
        return  # the stage saves its final checkpoint itself
    preempted = run.preemption.requested()
    if preempted or (every and step % every == 0):
        path = save(step)
        if preempted:
            bar.close()
            stop_preempted(run, step, path)


def newest_checkpoint(cfg: DictConfig, resolved: dict, world_size: int) -> tuple[int, Path] | None:
    """resume=auto: the newest intact checkpoint of this run directory made by the same config, or None.

    A checkpoint of another config (make's rule, as stage=pipeline compares done.json) means a fresh start; a
    different world size is an error (the ZeRO shards and every rank's RNG state belong to the old layout).
    """
    if cfg.resume not in RESUME:
        raise ConfigError(
            f"resume={cfg.resume!r}: choose never (start fresh) or auto (newest intact checkpoint)"
        )
    root = Path(cfg.run_dir) / "checkpoints"
    found = checkpoint.latest_intact(root) if cfg.resume == "auto" else None
    if found is None:
        if cfg.resume == "auto":
            log.info("resume=auto: no intact checkpoint in %s; starting fresh", root)
        return None
    from alignlab.runs import config_changes

    step, path = found
    manifest = checkpoint.read_manifest(path)
    changes = config_changes(cfg.stage.name, manifest.get("config", {}), resolved)
    if changes:
        log.warning(
            "resume=auto: %s was made with another config (%s); starting fresh", path, "; ".join(changes)
        )
        return None
    if manifest.get("world_size", world_size) != world_size:
        raise ConfigError(
            f"resume=auto: {path} was saved by {manifest['world_size']} ranks, this run has {world_size}; resume "
            f"with the same number of processes, or start fresh with resume=never"
        )
    return step, path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(cfg: DictConfig, *, resumable: bool = False, find_resume: Callable | None = None) -> Run:
    """Process group, seeds, run directory and config.yaml, tracker; for a training stage (resumable) also the
    resume point (resume=auto) and the watch for SIGTERM/SIGUSR1/SIGUSR2, which it must then poll.

    find_resume(cfg, resolved, world_size) -> (step, checkpoint) | None: a stage's own rule for where it resumes
    (default: the newest intact checkpoint in <run_dir>/checkpoints made by the same config). Stages that do not
    checkpoint keep the signals' default actions (a SIGTERM stops them at once).
    """
    env = distributed.init()
    if not env.is_main:
        # Other ranks compute silently; rank 0 speaks for the job.
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(cfg.seed)
    run_dir = Path(cfg.run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    found: tuple[int, Path] | ValueError | None = None
    if resumable and env.is_main:
        try:
            found = (find_resume or newest_checkpoint)(cfg, resolved, env.world_size)
        except ValueError as e:  # raised on every rank below, not on rank 0 alone (the others would wait)
            found = e
    found = distributed.gather_objects(found)[0]  # rank 0's decision, for every rank
    if isinstance(found, ValueError):
        raise found
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
        if resumable and found is None and (run_dir / "checkpoints").exists():
            # a fresh run: an earlier run's checkpoints would be taken for this one's by a later resume=auto
            log.info("removing the previous run's %s (fresh start)", run_dir / "checkpoints")
            shutil.rmtree(run_dir / "checkpoints")
        if found is not None:
            # checkpoints after the one resumed from are broken ones (or a save cut short): this run rewrites them
            for step, path in checkpoint.list_checkpoints(found[1].parent):
                if step > found[0]:
                    shutil.rmtree(path)
    distributed.barrier()
    tracker = Tracker(
        run_dir,
        is_main=env.is_main,
        backend=cfg.logger.name,
        config=resolved,
        wandb_project=cfg.logger.project,
        wandb_entity=cfg.logger.entity,
        wandb_group=cfg.logger.group,
        wandb_mode=cfg.logger.mode,
        wandb_tags=list(cfg.logger.tags),
        run_name=f"{cfg.experiment.name}/{cfg.stage.name}",
        job_type=cfg.logger.job_type,
        notes=cfg.experiment.description,
        show_progress=cfg.logger.progress,
        resume_step=found[0] if found else None,
    )
    log.info(
        "stage=%s experiment=%s (%s) run_dir=%s world_size=%d",
        cfg.stage.name,
        cfg.experiment.name,
        cfg.experiment.description,
        run_dir,
        env.world_size,
    )
    if found:
        log.info("resume=auto: continuing from %s (step %d)", found[1], found[0])
    return Run(
        env=env,
        device=distributed.device(env),
        run_dir=run_dir,
        tracker=tracker,
        config=resolved,
        resume=found[1] if found else None,
        resume_step=found[0] if found else 0,
        keep_checkpoints=cfg.keep_checkpoints,
        preemption=checkpoint.preemption() if resumable else PreemptionWatch(),
    )


def deepspeed_json(
    ds_cfg: DictConfig, *, micro_batch_size: int, grad_accum: int, world_size: int, grad_clip: float, dtype
) -> dict:
    """The DeepSpeed JSON of one engine: the `deepspeed=` preset plus the stage's batch arithmetic."""
    return distributed.deepspeed_config(
        zero_stage=ds_cfg.zero_stage,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        world_size=world_size,
        grad_clip=grad_clip,
        dtype=dtype,
        offload_optimizer=ds_cfg.offload_optimizer,
        offload_param=ds_cfg.offload_param,
        overlap_comm=ds_cfg.overlap_comm,
        reduce_bucket_size=ds_cfg.reduce_bucket_size,
        extra=dict(ds_cfg.extra),
    )


def tinyhh_dir(cfg: DictConfig) -> Path:
    """The generated TinyHH data directory (rank 0 generates, the others wait and reuse it)."""
    from alignlab.tinyhh.emitters import Sizes, ensure

    sizes = Sizes(**OmegaConf.to_container(cfg.data.tinyhh))
    if distributed.is_main():
        ensure(cfg.data.cache_dir, sizes)
    distributed.barrier()
    return ensure(cfg.data.cache_dir, sizes)  # a no-op lookup once rank 0 has written it


# ---------------------------------------------------------------- stages built on transformers' Trainer (SFT, RM)

# Trainer log keys -> our namespaced metric names (anything else: train/<key>, eval_<key> -> eval/<key>).
_TRAINER_KEYS = {
    "loss": "train/loss",
    "learning_rate": "train/lr",
    "grad_norm": "train/grad_norm",
    "train_runtime": "perf/train_runtime_s",
    "train_samples_per_second": "perf/samples_per_s",
    "train_steps_per_second": "perf/steps_per_s",
    "train_loss": "train/mean_loss",
    "eval_runtime": "perf/eval_runtime_s",
    "eval_samples_per_second": None,
    "eval_steps_per_second": None,
    "total_flos": None,
}


def trainer_metric_name(key: str) -> str | None:
    if key in _TRAINER_KEYS:
        return _TRAINER_KEYS[key]
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    return "train/" + key


class TrackerCallback:
    """Forwards the Trainer's log lines to our Tracker (metrics.jsonl, W&B) under namespaced keys, adding tokens/s.

    A duck-typed TrainerCallback: the Trainer calls the hooks it finds.
    """

    def __init__(self, tracker: Tracker, prefix_eval: str = "eval/", step_offset: int = 0):
        # step_offset: where this Trainer's step 0 sits in the run (stages that train several times, e.g.
        # rejection sampling's iterations, keep one increasing step axis in metrics.jsonl and W&B)
        self.tracker, self.prefix_eval, self.step_offset = tracker, prefix_eval, step_offset
        self._last: tuple[float, float] | None = None  # (time, num_tokens) at the previous log line
        self.evaluations: list[tuple[int, dict]] = []  # (step, metrics) of every evaluation, in order

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, **kwargs):
        # resumed: the evaluations before the checkpoint are in the Trainer's restored log history
        self.evaluations = [
            (self.step_offset + h["step"], {k: v for k, v in h.items() if k.startswith("eval_")})
            for h in state.log_history
            if any(k.startswith("eval_") for k in h)
        ]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append((self.step_offset + state.global_step, dict(metrics or {})))

    def on_log(self, args, state, control, logs=None, **kwargs):
        import time

        if "train_loss" in (logs or {}) and state.global_step < state.max_steps:
            return  # the Trainer's end-of-training summary of a run a signal stopped: not the run's mean loss
        row = {}
        for key, value in (logs or {}).items():
            name = trainer_metric_name(key)
            if name and isinstance(value, (int, float)):
                row[name] = value
        if "train/num_tokens" in row:
            now = (time.perf_counter(), row["train/num_tokens"])
            if self._last and now[0] > self._last[0]:
                row["perf/tokens_per_s"] = (now[1] - self._last[1]) / (now[0] - self._last[0])
            self._last = now
        if row and state.is_world_process_zero:
            self.tracker.log(row, step=self.step_offset + state.global_step)


class CheckpointCallback:
    """The Trainer's checkpoints as resumable points: committed with a manifest, pruned, and saved on a signal.

    The Trainer writes checkpoint-<step>/ (DeepSpeed state, trainer state, every rank's RNG, data position); on
    SIGTERM/SIGUSR1 this asks it for a checkpoint at the end of the current step and to stop there.
    """

    def __init__(self, run: Run):
        self.run = run
        self.preempted: tuple[int, Path] | None = None  # (step, checkpoint) when a signal stopped training
        self.trainer = None  # set by train_resumable: TRL's token counter is not in the Trainer's checkpoint

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps and self.run.preemption.requested():
            self.preempted = (
                state.global_step,
                checkpoint.checkpoint_path(args.output_dir, state.global_step),
            )
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every rank's shards and RNG state are on disk
        if state.is_world_process_zero:
            path = checkpoint.checkpoint_path(args.output_dir, state.global_step)
            tokens = getattr(self.trainer, "_total_train_tokens", None)
            checkpoint.write_manifest(
                path,
                state.global_step,
                config=self.run.config,
                world_size=self.run.env.world_size,
                state={"num_tokens": tokens} if tokens is not None else {},
            )
            checkpoint.prune(args.output_dir, self.run.keep_checkpoints)
        distributed.barrier()


def trainer_arguments(
    args_cls,
    *,
    run: Run,
    ds_cfg: DictConfig,
    stage: DictConfig,
    steps: int,
    dtype: torch.dtype,
    seed: int,
    show_progress: bool,
    with_eval: bool = True,
    output_dir: Path | None = None,
    **extra,
):
    """TrainingArguments (SFTConfig / RewardConfig / TrainingArguments) for a stage on the shared DeepSpeed engine.

    The DeepSpeed JSON comes from the same `deepspeed=` preset as every other stage; the Trainer builds AdamW
    and the schedule and hands them to DeepSpeed, as our own loops do.
    """
    accum = distributed.grad_accum_steps(stage.batch_size, stage.micro_batch_size, run.env.world_size)
    ds_json = deepspeed_json(
        ds_cfg,
        micro_batch_size=stage.micro_batch_size,
        grad_accum=accum,
        world_size=run.env.world_size,
        grad_clip=stage.grad_clip,
        dtype=dtype,
    )
    scheduler_kwargs = (
        {"min_lr_rate": stage.min_lr_ratio} if stage.lr_scheduler == "cosine_with_min_lr" else {}
    )
    return args_cls(
        output_dir=str(output_dir or run.run_dir / "checkpoints"),
        per_device_train_batch_size=stage.micro_batch_size,
        per_device_eval_batch_size=stage.micro_batch_size,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=stage.lr,
        lr_scheduler_type=stage.lr_scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=int(round(stage.warmup_ratio * steps)),
        weight_decay=stage.weight_decay,
        adam_beta1=stage.betas[0],
        adam_beta2=stage.betas[1],
        max_grad_norm=stage.grad_clip,
        logging_steps=stage.log_every,
        # with_eval: held-out evaluation of the starting model, every eval_every steps, and at the last step.
        eval_strategy="steps" if with_eval else "no",
        eval_steps=(stage.eval_every or steps) if with_eval else None,
        eval_on_start=with_eval,
        # checkpoints/checkpoint-<step>: every checkpoint_every steps (0: only the last), on a signal (see
        # CheckpointCallback), committed by a manifest and pruned by us (save_total_limit would skip the manifest)
        save_strategy="steps",
        save_steps=stage.get("checkpoint_every") or steps,
        save_total_limit=None,
        seed=seed,
        data_seed=seed,
        report_to=[],
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        deepspeed=ds_json,
        disable_tqdm=not (show_progress and run.env.is_main),
        dataloader_num_workers=0,
        activation_checkpointing=bool(stage.get("gradient_checkpointing", False)),  # TRL defaults it on
        train_sampling_strategy="group_by_length" if stage.get("group_by_length", False) else "random",
        **extra,
    )


def check_init_from(init_from: str, run_dir: Path) -> Path:
    """Fail fast when the starting model is missing or is this run's own output; return <run_dir>/model."""
    from alignlab import models

    model_out = run_dir / "model"
    models.require_input(init_from, "stage.init_from")
    if models.same_path(init_from, model_out):
        raise ConfigError(f"stage.init_from={init_from} is this run's own output; set run_dir= elsewhere")
    return model_out


def steps_for(stage: DictConfig, n_rows: int) -> int:
    """Optimizer steps: stage.steps when set, else stage.epochs passes over n_rows (at least one step)."""
    if stage.steps:
        return stage.steps
    return max(1, math.ceil(stage.epochs * n_rows / stage.batch_size))


def train_resumable(trainer, run: Run, callback: CheckpointCallback, resume_from: Path | None) -> None:
    """trainer.train(), continued from resume_from when given; stop the stage (exit 75) when a signal stopped it."""
    callback.trainer = trainer
    if resume_from is not None:
        trainer.args.eval_on_start = False  # the start's evaluation is in the checkpoint's log history
        tokens = checkpoint.read_manifest(resume_from).get("state", {}).get("num_tokens")
        if tokens is not None:
            trainer._total_train_tokens = tokens  # TRL's train/num_tokens continues where it stopped
    elif run.env.is_main and Path(trainer.args.output_dir).is_dir():
        # a fresh start: checkpoints of an earlier run here would be taken for this one's by resume=auto
        for _, old in checkpoint.list_checkpoints(trainer.args.output_dir):
            shutil.rmtree(old)
    distributed.barrier()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if callback.preempted:
        stop_preempted(run, *callback.preempted)


def save_trainer_model(trainer, tokenizer, out_dir: Path, env: distributed.DistEnv, step: int) -> None:
    """The model (gathered on rank 0 under ZeRO-3) into out_dir; the Trainer saved its resumable state already."""
    from alignlab.checkpoint import save_pretrained

    engine = trainer.model_wrapped
    state = distributed.full_state_dict(engine)
    if env.is_main:
        save_pretrained(engine.module, tokenizer, out_dir, state_dict=state)
        log.info("saved %s", out_dir)
    distributed.barrier()
