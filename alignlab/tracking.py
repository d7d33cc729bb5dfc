"""Metrics sink: metrics.jsonl always (rank 0), W&B when configured, tqdm progress bars with throughput.

docs/tracking.md describes the files, the W&B run (grouping, offline mode, resume) and reading an offline run back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import string
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from alignlab.checkpoint import atomic_write_text

log = logging.getLogger("alignlab.tracking")

LOGGERS = ("jsonl", "wandb")  # logger.name
WANDB_MODES = ("online", "offline", "disabled")  # logger.mode (None: see resolve_wandb_mode)
RUN_ID_FILE = "run_id"  # <run_dir>/wandb/run_id: the W&B run a resumed (requeued) job continues


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


def new_wandb_id() -> str:
    """8 characters of [a-z0-9], the form W&B gives its own run ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def row_key(row: dict[str, Any]) -> tuple:
    """A metrics.jsonl row's identity for resuming: its step and metric names."""
    return (row["step"], *sorted(k for k in row if k not in ("step", "time")))


class Tracker:
    """Writes one JSON object per log() call to <run_dir>/metrics.jsonl; mirrors to W&B when enabled.

    Every rank may call log(); only the main process writes, so callers never branch on rank.
    resume_step: this run continues from a checkpoint taken at that step. metrics.jsonl keeps its rows up to that
    step (rows logged after the checkpoint are re-logged by the resumed run) and the W&B run recorded in
    <run_dir>/wandb/run_id is continued. None: a fresh run (fresh metrics.jsonl, fresh W&B run).
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
        job_type: str | None = None,
        notes: str | None = None,
        show_progress: bool = True,
        resume_step: int | None = None,
    ):
        if backend not in LOGGERS:
            raise ValueError(f"logger.name={backend!r} is not a logger; choose one of {', '.join(LOGGERS)}")
        self.is_main = is_main
        self.show_progress = show_progress and is_main
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / "metrics.jsonl"
        self._file = None
        self._wandb = None
        self._wandb_after = -math.inf  # steps at or below this are already in the continued W&B run
        # resuming: (step, metric names) of the rows kept from before the checkpoint; the resumed run's set-up
        # logs some of them again (data sizes at step 0), and a metric is written once per step
        self._kept_rows: set[tuple] = set()
        self.sync_paths: list[Path] = []  # offline: what to pass to `wandb sync`, in order
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last_step = self._open_metrics(resume_step)
        if backend == "wandb":
            self._init_wandb(
                resume_step is not None,
                last_step,
                mode=resolve_wandb_mode(wandb_mode),
                project=wandb_project,
                entity=wandb_entity,
                group=wandb_group,
                name=run_name,
                job_type=job_type,
                notes=notes or None,
                tags=wandb_tags or None,
                config=config,
            )

    def _open_metrics(self, resume_step: int | None) -> float:
        """Open metrics.jsonl for this run; return the last step the file held before (-inf: none)."""
        if resume_step is None or not self.path.exists():
            # A fresh run starts a fresh file: rows of an earlier run in the same directory would mix with ours.
            self._file = open(self.path, "w", buffering=1)
            return -math.inf
        kept, dropped, torn, last = [], 0, 0, -math.inf
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                row = json.loads(line)
                step = row["step"]
            except (ValueError, KeyError, TypeError):
                torn += 1  # a line cut short by the kill that ended the previous attempt
                continue
            last = max(last, step)
            if step <= resume_step:
                kept.append(line if line.endswith("\n") else line + "\n")
                self._kept_rows.add(row_key(row))
            else:
                dropped += 1
        atomic_write_text(self.path, "".join(kept))
        log.info(
            "metrics.jsonl: resuming at step %d, kept %d rows, dropped %d logged after that checkpoint%s",
            resume_step,
            len(kept),
            dropped,
            f" and {torn} unreadable (torn) lines" if torn else "",
        )
        self._file = open(self.path, "a", buffering=1)
        return last

    def _init_wandb(self, resuming: bool, last_step: float, mode: str, **init_args) -> None:
        import wandb

        id_file = self.run_dir / "wandb" / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.exists() else None
        if run_id:
            # W&B ignores a step below the run's last one, so the steps re-run after the checkpoint keep the values
            # logged before the restart there (metrics.jsonl has the re-run ones); skipping them says so up front.
            self._wandb_after = last_step
            log.info("W&B: continuing run %s (it already holds steps up to %s)", run_id, last_step)
        else:
            run_id = new_wandb_id()
            atomic_write_text(id_file, run_id + "\n")
        self._wandb = wandb.init(
            id=run_id,
            resume="allow" if resuming else None,
            dir=str(self.run_dir),
            mode=mode,
            **init_args,
        )
        if mode == "offline":
            # Every offline attempt of this run id (a requeued job adds one), oldest first; wandb sync uploads them
            # in that order into the one W&B run.
            self.sync_paths = offline_attempts(self.run_dir / "wandb", run_id)
            self._sync_hint()

    def _sync_hint(self) -> None:
        log.info(
            "W&B is offline: run %s is saved under the run directory. Upload it with:\n    wandb sync %s",
            self._wandb.id,
            " ".join(str(p) for p in self.sync_paths),
        )

    def _to_wandb(self, payload: dict[str, Any], step: int) -> None:
        if self._wandb is not None and step > self._wandb_after:
            self._wandb.log(payload, step=step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        if row_key(row) in self._kept_rows:
            return
        self._file.write(json.dumps(row) + "\n")
        self._to_wandb({k: v for k, v in row.items() if k not in ("step", "time")}, step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """A table of rows (e.g. prompt, response, score) to W&B when enabled; callers also keep it in a file."""
        if self._wandb is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        self._to_wandb({name: table}, step)

    def log_images(self, images: dict[str, str | Path], step: int) -> None:
        """Image files (plots written into the run directory) to W&B when enabled, one panel per name."""
        if self._wandb is None:
            return
        import wandb

        found = {name: Path(p) for name, p in images.items() if Path(p).is_file()}
        for name in images.keys() - found.keys():
            log.warning("W&B: no image file %s for %s; not logged", images[name], name)
        if found:
            self._to_wandb({name: wandb.Image(str(p), caption=p.name) for name, p in found.items()}, step)

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
            import wandb

            self._wandb.finish()
            # finish() can return before wandb-core has written the run file out (seen offline); teardown waits
            # for it, so the run directory is complete (readable, syncable) once close() returns.
            wandb.teardown()
            if self.sync_paths:
                self._sync_hint()  # again at the end, where a user reading the log looks
            self._wandb = None


def offline_attempts(wandb_dir: str | Path, run_id: str) -> list[Path]:
    """The offline-run-<time>-<id>[-<n>] directories of one W&B run (one per attempt of a requeued job), in order."""
    found = []  # W&B adds -<n> to an attempt that starts within the same second as the previous one
    for d in Path(wandb_dir).glob(f"offline-run-*-{run_id}*"):
        m = re.fullmatch(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?", d.name)
        if m and d.is_dir():
            found.append(((m[1], int(m[2] or 0)), d))
    return [d for _, d in sorted(found)]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of <run_dir>/metrics.jsonl (for tests, reports and plots)."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------- reading an offline W&B run back

# A .wandb file is a 7-byte header then LevelDB's log format: 32 KiB blocks of chunks, each chunk a 7-byte header
# (CRC-32 of type byte + data, length, type) and data; a record too long for a block is split FIRST/MIDDLE/LAST.
_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK, _CHUNK_HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str | Path) -> Iterator[bytes]:
    """The serialized protobuf Records of one .wandb file, in order (a torn tail from a killed run ends it)."""
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(_HEADER):
        raise ValueError(f"{path} is not a W&B run file (header {data[:7]!r})")
    pos, pending = len(_HEADER), b""
    while pos + _CHUNK_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK_HEADER:  # a block's tail too short for a header is zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        if kind == 0 or len(chunk) < length:
            return  # zero fill or a write cut short: the end of what was recorded
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: record at byte {pos} fails its checksum (corrupt file)")
        pos += _CHUNK_HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            yield pending


@dataclass
class WandbOfflineRun:
    """What an offline W&B run will upload: its identity, config, history rows and summary."""

    id: str
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step": _step, <metric>: value, ...}
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # the .wandb files read, oldest first


def _put(out: dict[str, Any], item) -> None:
    """One config/history/summary item into out; W&B splits a nested value (a media reference) into its leaves."""
    keys = [item.key] if item.key else list(item.nested_key)
    for k in keys[:-1]:
        out = out.setdefault(k, {})
    out[keys[-1]] = json.loads(item.value_json)


def _public(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not k.startswith("_")}  # W&B's own _step, _runtime, _wandb


def read_wandb_offline(path: str | Path) -> WandbOfflineRun:
    """Read an offline W&B run back (e.g. to check it before `wandb sync`).

    path: a run directory (its wandb/run_id names the run; every attempt of a resumed run is read, oldest first)
    or one wandb/offline-run-* directory. Media (images, tables) appear in history as W&B's references
    ({"_type": "image-file", "path": "media/images/...", ...}) to files under the attempt's files/.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if (path / "wandb" / RUN_ID_FILE).exists():
        run_id = (path / "wandb" / RUN_ID_FILE).read_text().strip()
        files = [f for d in offline_attempts(path / "wandb", run_id) for f in d.glob("run-*.wandb")]
    else:
        files = sorted(path.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run file under {path} (was the run made with logger=wandb?)")
    run = WandbOfflineRun(id=files[0].stem.removeprefix("run-"), files=files)
    for file in files:
        for raw in wandb_records(file):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.project, run.name, run.group, run.job_type = (
                    r.project,
                    r.display_name,
                    r.run_group,
                    r.job_type,
                )
                items = r.config.update
            elif kind == "config":
                items = record.config.update
            elif kind == "summary":
                for item in record.summary.update:
                    _put(run.summary, item)
                continue
            elif kind == "history":
                values: dict[str, Any] = {}
                for item in record.history.item:
                    _put(values, item)
                run.history.append({"step": values.get("_step"), **_public(values)})
                continue
            else:
                continue
            for item in items:
                _put(run.config, item)
    run.config, run.summary = _public(run.config), _public(run.summary)
    return run
