"""What every recipe does first: process group, seeds, run directory with its resolved config.yaml, tracker."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from alignlab import distributed
from alignlab.checkpoint import atomic_write_text
from alignlab.tracking import Tracker

log = logging.getLogger("alignlab")


@dataclass
class Run:
    env: distributed.DistEnv
    device: torch.device
    run_dir: Path
    tracker: Tracker


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(cfg: DictConfig) -> Run:
    env = distributed.init()
    if not env.is_main:
        # Other ranks compute silently; rank 0 speaks for the job.
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(cfg.seed)
    run_dir = Path(cfg.run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
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
        notes=cfg.experiment.description,
        show_progress=cfg.logger.progress,
    )
    log.info(
        "stage=%s experiment=%s (%s) run_dir=%s world_size=%d",
        cfg.stage.name,
        cfg.experiment.name,
        cfg.experiment.description,
        run_dir,
        env.world_size,
    )
    return Run(env=env, device=distributed.device(env), run_dir=run_dir, tracker=tracker)


def tinyhh_dir(cfg: DictConfig) -> Path:
    """The generated TinyHH data directory (rank 0 generates, the others wait and reuse it)."""
    from alignlab.tinyhh.emitters import Sizes, ensure

    sizes = Sizes(**OmegaConf.to_container(cfg.data.tinyhh))
    if distributed.is_main():
        ensure(cfg.data.cache_dir, sizes)
    distributed.barrier()
    return ensure(cfg.data.cache_dir, sizes)  # a no-op lookup once rank 0 has written it
