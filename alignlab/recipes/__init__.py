"""One module per stage; each exposes run(cfg) and reads top to bottom: setup -> loop -> save."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

# Stage presets that run another stage's recipe with different defaults (see STAGES in alignlab/config.py).
RECIPE_OF = {"ppo_ptx": "ppo"}


def run_stage(cfg: DictConfig, stage: str) -> None:
    """Run the recipe of the chosen `stage=` option (cfg.stage.name only names the run directory)."""
    importlib.import_module(f"alignlab.recipes.{RECIPE_OF.get(stage, stage)}").run(cfg)
