"""Entry point: `python -m alignlab stage=<name> ...` composes the config with Hydra and runs the stage."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from alignlab.config import register_configs
from alignlab.errors import EXIT_USER_ERROR, AlignlabError

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    try:
        return run(cfg, hydra_cfg)
    except AlignlabError as e:
        # A setting, a data file or a missing input: the message says what and how to fix it, a traceback would
        # bury it (and Hydra would add its own). HYDRA_FULL_ERROR=1 shows the traceback all the same.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        code = report(e)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # one point of a -m sweep: Hydra records it as failed and runs the others
        raise SystemExit(code) from None


def run(cfg: DictConfig, hydra_cfg) -> int:
    # Imports are deferred so --help / --cfg stay fast and never touch torch or DeepSpeed.
    from alignlab import launch, validate
    from alignlab.recipes import run_stage
    from alignlab.stages import STAGES

    stage = hydra_cfg.runtime.choices["stage"]
    if not STAGES[stage].orchestrator and launch.needs_relaunch(cfg.launcher.name):
        # Checked here too, so a bad value fails once, before N processes start (each rank checks it again).
        validate.check(cfg, stage, world_size=cfg.launcher.nproc)
        # This job's own overrides (not sys.argv, which under -m or submitit is the whole sweep or another
        # program), with run_dir resolved once so every rank writes the same directory.
        overrides = list(hydra_cfg.overrides.task)
        code = launch.relaunch(
            cfg.launcher, launch.child_args(overrides, run_dir=os.path.abspath(cfg.run_dir))
        )
        if code:
            # Hydra drops a task's return value: the ranks' exit code (75: preempted, 2: an alignlab error each
            # rank has printed) must still reach the shell; a runner killed by signal N reports -N, a shell's 128 + N
            raise SystemExit(code if code > 0 else launch.exit_code_for_signal(-code))
        return 0
    run_stage(cfg, stage)
    return 0


def report(error: AlignlabError) -> int:
    """Print `error: <message>` (one line per rank that fails, rank-tagged when there are several); the exit code."""
    from alignlab.distributed import env_from

    env = env_from(dict(os.environ))
    who = f" (rank {env.rank})" if env.world_size > 1 else ""
    print(f"error{who}: {error}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def _help_needs_a_stage(argv: list[str]) -> bool:
    # Hydra composes the config to print --help, and `stage` has no default on purpose (a run must name it).
    return any(a in ("--help", "-h") for a in argv) and not any(a.startswith("stage=") for a in argv)


def _renamed(argv: list[str]) -> str | None:
    # Hydra would only say "Key 'max_new_tokens' is not in struct": name the key that replaced it.
    from alignlab.stages import renamed_key

    stage = next((a.split("=", 1)[1] for a in argv if a.startswith("stage=")), None)
    return renamed_key(stage, argv[1:]) if stage else None


if __name__ == "__main__":
    if _help_needs_a_stage(sys.argv):
        sys.argv.append("stage=pretrain")
    if message := _renamed(sys.argv):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(main())
