"""One module per stage; each exposes run(cfg) and reads top to bottom: setup -> loop -> save."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig


def run_stage(cfg: DictConfig, stage: str) -> None:
    """Run the recipe of the chosen `stage=` option (cfg.stage.name only names the run directory)."""
    importlib.import_module(f"alignlab.recipes.{stage}").run(cfg)
