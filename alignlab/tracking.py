"""Metrics sink: metrics.jsonl always (rank 0), W&B when configured, tqdm progress bars with throughput."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("alignlab.tracking")


def _jsonable(value: Any) -> Any:
    """Tensors and numpy scalars to plain floats; NaN/inf kept as strings so the file stays valid JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def resolve_wandb_mode(mode: str | None, environ: dict[str, str] | None = None) -> str:
    """Explicit mode > WANDB_MODE > online when an API key is set, else offline (no network needed)."""
    env = os.environ if environ is None else environ
    if mode:
        return mode
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    return "online" if env.get("WANDB_API_KEY") else "offline"


class Tracker:
    """Writes one JSON object per log() call to <run_dir>/metrics.jsonl; mirrors to W&B when enabled.

    Every rank may call log(); only the main process writes, so callers never branch on rank.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        is_main: bool,
        backend: str = "jsonl",
        config: dict[str, Any] | None = None,
        wandb_project: str = "alignlab",
        wandb_entity: str | None = None,
        wandb_group: str | None = None,
        wandb_mode: str | None = None,
        wandb_tags: list[str] | None = None,
        run_name: str | None = None,
        notes: str | None = None,
        show_progress: bool = True,
    ):
        if backend not in ("jsonl", "wandb"):
            raise ValueError(f"logger.name={backend!r} is not a logger; choose jsonl or wandb")
        self.is_main = is_main
        self.show_progress = show_progress and is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a fresh file: rows of an earlier run in the same directory would mix with ours.
        self._file = open(self.path, "w", buffering=1)
        if backend == "wandb":
            import wandb

            mode = resolve_wandb_mode(wandb_mode)
            self._wandb = wandb.init(
                project=wandb_project,
                entity=wandb_entity,
                group=wandb_group,
                name=run_name,
                notes=notes or None,
                tags=wandb_tags or None,
                config=config,
                dir=str(run_dir),
                mode=mode,
            )
            if mode == "offline":
                log.info("W&B is offline; upload later with: wandb sync %s", Path(run_dir) / "wandb")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """A table of rows (e.g. prompt, response, score) to W&B when enabled; callers also keep it in a file."""
        if self._wandb is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        self._wandb.log({name: table}, step=step)

    def progress(self, total: int, desc: str, initial: int = 0) -> tqdm:
        """A tqdm bar (disabled off rank 0 or when logger.progress=false); set_postfix carries throughput."""
        return tqdm(
            total=total, desc=desc, initial=initial, disable=not self.show_progress, dynamic_ncols=True
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of <run_dir>/metrics.jsonl (for tests, reports and plots)."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
