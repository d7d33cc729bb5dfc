"""Hydra multirun (-m) end to end: a 2-point sweep of a few pretraining steps (moved out of the config tier, which
only composes)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import alignlab

pytestmark = pytest.mark.slow


def test_a_sweep_gives_every_point_its_own_run_directory(tmp_path, data_cache):
    """-m: run_dir's default is the job's <sweep.dir>/<sweep.subdir>, never one directory shared by the points."""
    alignlab(
        "-m",
        "stage=pretrain",
        "experiment=quick",
        "stage.steps=2",
        "stage.sample_eval=0",
        "stage.eval_every=0",
        "stage.lr=1e-3,3e-3",
        f"paths.runs={tmp_path / 'runs'}",
        f"paths.data={data_cache}",
        cwd=tmp_path,
    )
    configs = sorted((tmp_path / "runs" / "quick" / "multirun").glob("*/*/config.yaml"))
    assert [c.parent.name for c in configs] == ["0", "1"]
    lrs = [OmegaConf.load(c).stage.lr for c in configs]
    assert lrs == [1e-3, 3e-3] and all((c.parent / "model").is_dir() for c in configs)
    assert not (tmp_path / "runs" / "quick" / "pretrain").exists()
