"""Atomic saves: files and directories appear whole or not at all, so a crash never leaves a half-written model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` (the old one is removed only then).

    Two renames, not one (a directory cannot atomically replace a non-empty one): a crash between them leaves
    the previous version intact as `.<name>.old-<pid>` next to the complete new one as `.<name>.tmp-<pid>`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained(module, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """save_pretrained of model (or PEFT adapter), tokenizer and generation config into out_dir, atomically."""
    with atomic_dir(out_dir) as tmp:
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def save_engine_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any]) -> None:
    """DeepSpeed's resumable state (model, optimizer, scheduler; ZeRO shards written by their own ranks).

    Collective: every rank must call it. DeepSpeed writes the `latest` tag file after all shards are on disk.
    """
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:08d}", client_state=client_state)
