"""Atomic saves: files and directories appear whole or not at all, so a crash never leaves a half-written model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("alignlab.checkpoint")


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
    """save_pretrained of model, tokenizer and generation config into out_dir, atomically.

    A PEFT model is saved twice: out_dir holds the full model with the adapter merged (what plain
    `from_pretrained` and the next stage load: the policy that finished training, not base + this stage's
    adapter), and out_dir/adapter the adapter alone, its base_model_name_or_path the model this stage started
    from. `state_dict` is the module's full state dict (gathered on rank 0 under ZeRO-3).
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if is_peft(module):
            save_peft(module, tmp, out_dir, state_dict)
        else:
            module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def is_peft(module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def save_peft(module, tmp: Path, out_dir: Path, state_dict: dict | None) -> None:
    """The merged model into tmp and the adapter into tmp/adapter (see save_pretrained)."""
    state_dict = module.state_dict() if state_dict is None else state_dict
    merged = merged_copy(module, state_dict)
    merged.save_pretrained(tmp, safe_serialization=True)
    config = module.peft_config[module.active_adapter]
    base = config.base_model_name_or_path
    if base and Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    if base and base == str(out_dir.expanduser().resolve()):
        # e.g. rejection sampling's iterations fine-tuning the previous one in place: the base is being replaced
        log.warning(
            "saved %s: merged model (%s, %s) only; no adapter/: its base was %s itself",
            out_dir,
            type(merged).__name__,
            merged.dtype,
            out_dir,
        )
        return
    module.save_pretrained(tmp / "adapter", state_dict=state_dict, safe_serialization=True)
    adapter_config = tmp / "adapter" / "adapter_config.json"
    saved = json.loads(adapter_config.read_text())
    saved["base_model_name_or_path"] = base
    atomic_write_json(adapter_config, saved)
    log.info(
        "saved %s: merged model (%s, %s; adapter merged, trained modules_to_save %s) and adapter/ (base %s)",
        out_dir,
        type(merged).__name__,
        merged.dtype,
        sorted(config.modules_to_save or []),
        base,
    )


def merged_copy(peft_model, state_dict: dict):
    """A new transformers model equal to peft_model with state_dict loaded and its adapter merged (in float32).

    Built from the config, not copied: under ZeRO-3 the live module's parameters are empty partitions. The
    result has the state dict's floating dtype; its generation config is the live model's.
    """
    import copy

    import torch
    from peft import get_peft_model
    from transformers.initialization import no_init_weights

    base = peft_model.get_base_model()
    with no_init_weights():
        fresh = type(base)(copy.deepcopy(base.config)).float()  # no zero.Init: only from_config uses it
    if getattr(base, "generation_config", None) is not None:  # causal LMs only
        fresh.generation_config = copy.deepcopy(base.generation_config)
    wrapped = get_peft_model(fresh, copy.deepcopy(peft_model.peft_config[peft_model.active_adapter]))
    missing, unexpected = wrapped.load_state_dict(state_dict, strict=False)
    # a tied weight (lm_head = embeddings) may be saved under one of its names only
    own = wrapped.state_dict()
    loaded_ptrs = {t.data_ptr() for k, t in own.items() if k not in missing}
    missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if missing or unexpected:
        raise ValueError(
            f"the state dict does not fit {type(peft_model).__name__}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}"
        )
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    return wrapped.merge_and_unload().to(dtype)


# --- Resumable checkpoints and preemption ---------------------------------------------------------------------
#
# <run_dir>/checkpoints/checkpoint-<step>/ holds one resumable point of a training stage: the DeepSpeed state of
# every engine (model, optimizer, scheduler; ZeRO shards written by their own ranks) or a Trainer's checkpoint,
# every rank's RNG state, and manifest.json. The manifest is written last, by rank 0, once every rank has
# written its files: it is the commit mark. It lists each file with its size, so a checkpoint whose save was
# interrupted (no manifest) or whose files were truncated or lost afterwards is recognised and the previous one
# is used instead.

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: checkpointed on a signal; the sbatch templates requeue on this code
PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """A training loop saved a checkpoint on a scheduler's signal and stopped; the process exits PREEMPTED_EXIT."""

    def __init__(self, signum: int, step: int, path: Path):
        super().__init__(f"{signal.Signals(signum).name}: checkpointed step {step} in {path}")
        self.signum, self.step, self.path = signum, step, path


class PreemptionWatch:
    """SIGTERM / SIGUSR1 / SIGUSR2 set a flag that training loops poll at step boundaries (see requested()).

    SLURM sends SIGTERM before killing a preempted or cancelled job, and `--signal=USR1@<s>` before a time limit;
    submitit uses SIGUSR2. Repeats are ignored (the scheduler's SIGKILL is the hard stop); Ctrl-C (SIGINT) is
    not handled here and interrupts at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionWatch:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return self  # installed already, or not the main thread (only it may set signal handlers)
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            # A repeat (srun and slurmstepd both deliver a scancel's SIGTERM; DeepSpeed's launcher passes its own on)
            # must not cut the checkpoint short: the scheduler's SIGKILL after its grace time is the hard stop.
            log.warning("received %s again: still checkpointing", signal.Signals(signum).name)
            return
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the next step boundary", signal.Signals(signum).name)

    def requested(self) -> bool:
        """Whether any rank got a signal (a collective: every rank must call it at the same step)."""
        import torch.distributed as dist

        flag = 0.0 if self.signum is None else 1.0
        if dist.is_initialized() and dist.get_world_size() > 1:
            from alignlab.distributed import means_over_ranks

            return means_over_ranks({"preempt": flag})["preempt"] > 0
        return flag > 0

    def chain(self) -> None:
        """After the checkpoint: run the handler the signal had before ours (submitit's requeue), if any."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous):
            previous(self.signum, None)


_WATCH = PreemptionWatch()


def preemption() -> PreemptionWatch:
    """The process's watch, its handlers installed on first use."""
    return _WATCH.install()


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-<step> directory under root, newest first."""
    root = Path(root)
    found = []
    for p in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        suffix = p.name[len(PREFIX) :]
        if p.is_dir() and suffix.isdigit():
            found.append((int(suffix), p))
    return sorted(found, reverse=True)


def write_manifest(path: str | Path, step: int, **info: Any) -> None:
    """Commit a checkpoint directory: every file's size (and `info`) into manifest.json, written last."""
    path = Path(path)
    files = {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != MANIFEST and not f.name.startswith(".")
    }
    atomic_write_json(path / MANIFEST, {"step": step, "files": files, "saved": time.time(), **info})


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def verify(path: str | Path) -> str | None:
    """Why the checkpoint at path cannot be resumed from (None when it is intact)."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        return "no manifest.json: its save did not finish"
    except (json.JSONDecodeError, OSError) as e:
        return f"unreadable manifest.json ({e})"
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} when saved (truncated?)"
    return None


def latest_intact(root: str | Path) -> tuple[int, Path] | None:
    """The newest checkpoint under root that verify() accepts; each newer broken one is named in a warning."""
    for step, path in list_checkpoints(root):
        problem = verify(path)
        if problem is None:
            return step, path
        log.warning("checkpoint %s is unusable: %s; trying the previous one", path, problem)
    return None


def prune(root: str | Path, keep: int) -> None:
    """Keep the newest `keep` intact checkpoints; remove every checkpoint directory older than the oldest kept."""
    intact = [(s, p) for s, p in list_checkpoints(root) if verify(p) is None]
    if keep < 1 or len(intact) <= keep:
        return
    oldest_kept = intact[keep - 1][0]
    for step, path in list_checkpoints(root):
        if step < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Inside, draw random numbers freely; on leaving, every generator (python, numpy, torch, CUDA) is back where
    it was. A mid-run evaluation runs inside, so how often a run is evaluated never changes its training."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def save_resumable(
    root: str | Path,
    step: int,
    engines: dict[str, Any],
    *,
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """A resumable point of an own-loop stage (pretrain, PPO): engines, every rank's RNG, loop state, manifest.

    Collective: every rank calls it. `state` (JSON, rank 0's) is the loop state all ranks share (KL coefficient,
    step counters); `rank_state` is this rank's own (e.g. its running loss sums), kept with its RNG state.
    """
    import torch

    from alignlab import distributed

    path = checkpoint_path(root, step)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # an unfinished save of the same step
    distributed.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(path), tag=name, client_state={"step": step}, save_latest=False)
    torch.save({**rng_state(), "rank_state": rank_state or {}}, path / f"rng_rank{rank}.pt")
    distributed.barrier()
    if rank == 0:
        write_manifest(path, step, state=state, config=config, world_size=world, engines=sorted(engines))
        prune(root, keep)
        log.info("checkpoint %s", path)
    distributed.barrier()
    return path


def load_resumable(path: str | Path, engines: dict[str, Any]) -> dict[str, Any]:
    """Restore what save_resumable wrote into the (already built) engines and this rank's RNG; return the shared
    state updated with this rank's own."""
    import torch

    path = Path(path)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, engine in engines.items():
        loaded, _ = engine.load_checkpoint(
            str(path), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {path / name}")
    mine = torch.load(path / f"rng_rank{rank}.pt", weights_only=False)
    set_rng_state(mine)
    return {**read_manifest(path)["state"], **mine.get("rank_state", {})}
