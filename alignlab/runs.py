"""A run's identity: make's rule on resolved configs, and the checks of resume=auto.

A finished run writes DONE with its resolved config; a stage runs again only when the part of the config that
decides its outputs changed. resume=auto, rejection sampling's iteration resume and the pipeline all use this rule.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignlab.errors import ConfigError
from alignlab.stages import uses_reward

DONE = "done.json"  # written last by a finished run: {"config": <resolved config>, ...}
RESUME = ("never", "auto")  # resume: start fresh | the newest intact checkpoint made by the same config
# The config groups that decide a stage's outputs (launcher, deepspeed and logger decide only how it runs); the
# stages that score with reward= (alignlab/stages.py) compare it too.
COMPARED = ("stage", "model", "data", "seed")
IGNORED = {"data.cache_dir", "data.tinyhh_any_model"}  # where the data lives; a guard, not what it is


def compared(stage: str, config: dict) -> dict:
    """The part of a resolved config that decides the stage's outputs."""
    groups = COMPARED + (("reward",) if uses_reward(stage) else ())
    out = {g: config.get(g) for g in groups}
    for dotted in IGNORED:
        group, key = dotted.split(".", 1)
        if isinstance(out.get(group), dict):
            out[group] = {k: v for k, v in out[group].items() if k != key}
    return out


def differences(a, b, prefix: str = "") -> list[str]:
    """'key: old -> new', 'key: added' or 'key: removed' for every leaf or subtree that differs."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [f"{prefix}: {a} -> {b}"]
    out = []
    for k in sorted(a.keys() | b.keys(), key=str):
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in a:
            out.append(f"{key}: added")
        elif k not in b:
            out.append(f"{key}: removed")
        else:
            out += differences(a[k], b[k], key)
    return out


def config_changes(stage: str, old: dict, new: dict, limit: int = 3) -> list[str]:
    """How the config a stage finished with differs from the one composed now (at most limit lines, then a count)."""
    diffs = differences(compared(stage, old), compared(stage, new))
    return diffs if len(diffs) <= limit else diffs[:limit] + [f"{len(diffs) - limit} more"]


def read_done(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / DONE).read_text())
    except (OSError, ValueError):
        return None


def resume_requested(resume: str) -> bool:
    """True for resume=auto, False for never; a ConfigError (a ValueError) for any other value."""
    if resume not in RESUME:
        raise ConfigError(f"resume={resume!r}: choose never (start fresh) or auto (newest intact checkpoint)")
    return resume == "auto"


def check_world_size(checkpoint: Path, manifest: dict, world_size: int) -> None:
    """resume=auto: a ConfigError when the checkpoint was saved by another number of ranks (its ZeRO shards and
    every rank's RNG state belong to that layout); manifest is the checkpoint's (alignlab/checkpoint.py)."""
    saved_by = manifest.get("world_size", world_size)
    if saved_by != world_size:
        raise ConfigError(
            f"resume=auto: {checkpoint} was saved by {saved_by} ranks, this run has {world_size}; resume "
            f"with the same number of processes, or start fresh with resume=never"
        )
