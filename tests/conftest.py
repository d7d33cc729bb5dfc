"""Shared fixtures: the repo root, a quiet offline environment for subprocess runs, a stage runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def alignlab(
    *overrides: str, cwd: Path, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `python -m alignlab <overrides>` in cwd; on failure show its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "alignlab", *overrides],
        cwd=cwd,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"alignlab {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-8000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One TinyHH data cache for the whole session (generation is deterministic, so sharing is safe)."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def tinyhh_root(tmp_path_factory, data_cache) -> Path:
    """A runs/ root holding the default TinyHH base model (the full ~5 minute pretraining), trained once per session.

    Later stages run with paths.runs=<root>/runs so their default init_from chain finds it.
    """
    root = tmp_path_factory.mktemp("tinyhh")
    alignlab(
        "stage=pretrain", f"paths.runs={root / 'runs'}", f"paths.data={data_cache}", cwd=root, timeout=900
    )
    return root


def run_stage(
    root: Path, data_cache: Path, *overrides: str, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """A stage with runs/ under root and the session's data cache (so default init_from chains resolve)."""
    return alignlab(
        *overrides,
        f"paths.runs={root / 'runs'}",
        f"paths.data={data_cache}",
        cwd=root,
        check=check,
        timeout=timeout,
    )


# The session's SFT and RM runs; stage=pipeline in tests/science passes the same overrides, so it finds them
# finished (same resolved config in their done.json) and skips them.
SFT_OVERRIDES = ["stage.sample_eval=100"]
RM_OVERRIDES = ["stage.normalize_samples=128"]
# The recipe tests' PPO and PPO-ptx runs (tests/recipes/test_ppo.py), fewer iterations than the default; the
# pipeline science test reuses the PPO one.
PPO_SHORT = ["stage.iterations=50", "stage.sample_eval=100", "stage.samples_every=10"]


@pytest.fixture(scope="session")
def tinyhh_sft(tinyhh_root, data_cache) -> Path:
    """The default SFT model on the session's base model (stage=sft, ~1 minute), trained once per session."""
    run_stage(tinyhh_root, data_cache, "stage=sft", *SFT_OVERRIDES)
    return tinyhh_root / "runs" / "tinyhh" / "sft"


@pytest.fixture(scope="session")
def tinyhh_rm(tinyhh_sft, tinyhh_root, data_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """The default reward model on that SFT model (stage=rm, ~1.5 minutes), with its normalisation."""
    proc = run_stage(tinyhh_root, data_cache, "stage=rm", *RM_OVERRIDES)
    return tinyhh_root / "runs" / "tinyhh" / "rm", proc
