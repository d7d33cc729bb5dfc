"""One module per stage; each exposes run(cfg) and reads top to bottom: setup -> loop -> save."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig


def run_stage(cfg: DictConfig) -> None:
    importlib.import_module(f"alignlab.recipes.{cfg.stage.name}").run(cfg)
