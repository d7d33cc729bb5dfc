"""The bridge from transformers' Trainer (and TRL's trainers built on it) to alignlab's runs: stage=sft, stage=rm
and the fine-tuning inside rejection sampling and context distillation.

TrainingArguments from a stage's config on the shared DeepSpeed preset, the Trainer's log lines into our Tracker
under namespaced keys, its checkpoints as resumable points (manifest, pruning, a checkpoint on a scheduler's
signal), and the model saved for the next stage.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from alignlab import checkpoint, distributed
from alignlab.checkpoint import save_pretrained
from alignlab.lifecycle import Run, deepspeed_json, stop_preempted
from alignlab.tracking import Tracker

log = logging.getLogger("alignlab")


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
    # the token count compute.json is made of (trainer_tokens); the Trainer's own tokens/s repeats perf/tokens_per_s
    "num_input_tokens_seen": None,
    "train_tokens_per_second": None,
}


# TRL's DPO keys with a slash, one name each: a second slash would read as stage=eval's eval/<system>/<metric>
_SLASHED = {
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
    "logps/chosen": "logp_chosen",
    "logps/rejected": "logp_rejected",
    "logits/chosen": "logit_chosen",
    "logits/rejected": "logit_rejected",
}


def trainer_metric_name(key: str) -> str | None:
    """Our metric name for a key of the Trainer's log line (None: not logged)."""
    if key in _TRAINER_KEYS:
        return _TRAINER_KEYS[key]
    if key.startswith("eval_"):
        return "eval/" + flat(key.removeprefix("eval_"))
    return "train/" + flat(key)


def flat(name: str) -> str:
    """A Trainer key as one name under our namespace (TRL's rewards/margins -> reward_margin)."""
    return _SLASHED.get(name, name.replace("/", "_"))


class TrackerCallback(TrainerCallback):
    """Forwards the Trainer's log lines to our Tracker (metrics.jsonl, W&B) under namespaced keys, adding tokens/s."""

    def __init__(self, tracker: Tracker, prefix_eval: str = "eval/", step_offset: int = 0):
        # step_offset: where this Trainer's step 0 sits in the run (stages that train several times, e.g.
        # rejection sampling's iterations, keep one increasing step axis in metrics.jsonl and W&B)
        self.tracker, self.prefix_eval, self.step_offset = tracker, prefix_eval, step_offset
        self._last: tuple[float, float] | None = None  # (time, num_tokens) at the previous log line
        self.evaluations: list[tuple[int, dict]] = []  # (step, metrics) of every evaluation, in order

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


class CheckpointCallback(TrainerCallback):
    """The Trainer's checkpoints as resumable points: committed with a manifest, pruned, and saved on a signal.

    The Trainer writes checkpoint-<step>/ (DeepSpeed state, trainer state, every rank's RNG, data position); on
    SIGTERM/SIGUSR1 this asks it for a checkpoint at the end of the current step and to stop there.
    """

    def __init__(self, run: Run):
        self.run = run
        self.preempted: tuple[int, Path] | None = None  # (step, checkpoint) when a signal stopped training
        self.trainer = None  # set by train_resumable: TRL's token counter is not in the Trainer's checkpoint

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
        # the non-padding positions of every training batch, over all ranks, kept in the Trainer's checkpointed
        # state: what trainer_tokens reads for compute.json
        include_num_input_tokens_seen="non_padding",
        **extra,
    )


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


def trainer_tokens(trainer) -> float:
    """The token positions the Trainer has trained on: every rank's non-padding positions of every micro-batch,
    across a resume (the count is in the checkpointed trainer state)."""
    return float(trainer.state.num_input_tokens_seen)


def save_trainer_model(trainer, tokenizer, out_dir: Path, env: distributed.DistEnv, step: int) -> None:
    """The model (gathered on rank 0 under ZeRO-3) into out_dir; the Trainer saved its resumable state already."""
    engine = trainer.model_wrapped
    state = distributed.full_state_dict(engine)
    if env.is_main:
        save_pretrained(engine.module, tokenizer, out_dir, state_dict=state)
        log.info("saved %s", out_dir)
    distributed.barrier()
