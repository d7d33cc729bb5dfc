"""Entry point: `python -m alignlab stage=<name> ...` composes the config with Hydra and runs the stage."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from alignlab.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> int:
    # Imports are deferred so --help / --cfg stay fast and never touch torch or DeepSpeed.
    from hydra.core.hydra_config import HydraConfig

    from alignlab import launch
    from alignlab.recipes import ORCHESTRATORS, run_stage

    stage = HydraConfig.get().runtime.choices["stage"]
    if stage not in ORCHESTRATORS and launch.needs_relaunch(cfg.launcher.name):
        # This job's own overrides (not sys.argv, which under -m or submitit is the whole sweep or another
        # program), with run_dir resolved once so every rank writes the same directory.
        overrides = list(HydraConfig.get().overrides.task)
        code = launch.relaunch(
            cfg.launcher, launch.child_args(overrides, run_dir=os.path.abspath(cfg.run_dir))
        )
        if code:
            # Hydra drops a task's return value: the ranks' exit code (75: preempted) must still reach the shell;
            # a runner killed by signal N reports -N, a shell's 128 + N
            raise SystemExit(code if code > 0 else 128 - code)
        return 0
    run_stage(cfg, stage)
    return 0


def _help_needs_a_stage(argv: list[str]) -> bool:
    # Hydra composes the config to print --help, and `stage` has no default on purpose (a run must name it).
    return any(a in ("--help", "-h") for a in argv) and not any(a.startswith("stage=") for a in argv)


if __name__ == "__main__":
    if _help_needs_a_stage(sys.argv):
        sys.argv.append("stage=pretrain")
    sys.exit(main())
