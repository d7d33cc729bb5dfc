"""One module per stage; each exposes run(cfg) and reads top to bottom: setup -> loop -> save."""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignlab import checkpoint, distributed, validate
from alignlab.checkpoint import atomic_write_text
from alignlab.runs import DONE
from alignlab.stages import STAGES

log = logging.getLogger("alignlab")


def run_stage(cfg: DictConfig, stage: str) -> None:
    """Run the recipe of the chosen `stage=` option (cfg.stage.name only names the run directory); what the
    registry (alignlab/stages.py) says of it decides the recipe and whether a scheduler's signal checkpoints."""
    spec = STAGES[stage]
    # before and after the recipe the process group may not exist: the launcher's variables say who we are
    env = distributed.env_from(dict(os.environ))
    # Every key and value first: a bad one must fail before the run directory is touched (done.json below, then
    # the recipe's config.yaml and checkpoints/), so it never costs a finished run its files.
    validate.check(cfg, stage, world_size=env.world_size)
    # DONE is written last, by rank 0, when the stage returns; it is removed first, so an interrupted re-run is
    # never mistaken for a finished one (alignlab/runs.py).
    done = Path(cfg.run_dir) / DONE
    main = env.is_main
    if spec.resumable:
        checkpoint.preemption()  # from now on a scheduler's signal means "checkpoint and stop", not "die"
    if main and done.exists():
        if cfg.resume == "auto":
            # A finished run is not continued: its last checkpoint is the end of training, and its inputs may
            # have changed since. (Rank 0 decides where to resume, for every rank: alignlab/lifecycle.py.)
            log.info("resume=auto: %s finished before (%s); starting fresh", cfg.run_dir, DONE)
            cfg.resume = "never"
        done.unlink()
    start = time.time()
    try:
        importlib.import_module(f"alignlab.recipes.{spec.recipe}").run(cfg)
    except checkpoint.Preempted as e:
        # No done.json: the stage is not finished. The sbatch templates requeue on this exit code and the
        # requeued job continues with resume=auto; under submitit its own handler requeues (chain()).
        log.warning("preempted (%s); continue with resume=auto", e)
        checkpoint.preemption().chain()
        raise SystemExit(checkpoint.PREEMPTED_EXIT) from None
    if main:
        marker = {
            "stage": stage,
            "finished": time.time(),
            "wall_s": round(time.time() - start, 3),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        atomic_write_text(done, json.dumps(marker, indent=1) + "\n")
