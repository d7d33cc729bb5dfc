"""What every recipe does first: process group, seeds, run directory with its resolved config.yaml, tracker."""

from __future__ import annotations

import logging
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
from alignlab.runs import check_world_size, config_changes, resume_requested
from alignlab.tracking import Tracker

log = logging.getLogger("alignlab")


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
    auto = resume_requested(cfg.resume)
    root = Path(cfg.run_dir) / "checkpoints"
    found = checkpoint.latest_intact(root) if auto else None
    if found is None:
        if auto:
            log.info("resume=auto: no intact checkpoint in %s; starting fresh", root)
        return None
    step, path = found
    manifest = checkpoint.read_manifest(path)
    changes = config_changes(cfg.stage.name, manifest.get("config", {}), resolved)
    if changes:
        log.warning(
            "resume=auto: %s was made with another config (%s); starting fresh", path, "; ".join(changes)
        )
        return None
    check_world_size(path, manifest, world_size)
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


def check_init_from(init_from: str, run_dir: Path) -> Path:
    """Fail fast when the starting model is missing or is this run's own output; return <run_dir>/model."""
    from alignlab import models

    model_out = run_dir / "model"
    models.require_input(init_from, "stage.init_from")
    if models.same_path(init_from, model_out):
        raise ConfigError(f"stage.init_from={init_from} is this run's own output; set run_dir= elsewhere")
    return model_out
