"""launcher=deepspeed|torchrun: re-execute the same command line on N processes, each running the stage."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from alignlab import checkpoint
from alignlab.distributed import free_port
from alignlab.errors import ConfigError

log = logging.getLogger("alignlab.launch")

# Set in the children so they run the stage instead of relaunching again.
CHILD_ENV = "ALIGNLAB_LAUNCHED"
LAUNCHERS = ("local", "deepspeed", "torchrun")
# What a process that starts others passes on to them: a scheduler's signals (checkpoint and stop) and Ctrl-C.
FORWARDED = (*checkpoint.SIGNALS, signal.SIGINT)


def exit_code_for_signal(signum: int) -> int:
    """A shell's exit status for a process killed by signal signum (Popen reports it as -signum)."""
    return 128 + signum


@contextlib.contextmanager
def forward_signals(forward: Callable[[int], None]) -> Iterator[None]:
    """While inside, each FORWARDED signal calls forward(signum), the policy of how children get it (relaunch:
    the ranks; stage=pipeline: every stage's process group, then it stops); the previous handlers after."""
    previous = {sig: signal.signal(sig, lambda signum, _frame: forward(signum)) for sig in FORWARDED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def needs_relaunch(launcher: str, environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if launcher not in LAUNCHERS:
        raise ConfigError(
            f"launcher.name={launcher!r} is not a launcher; choose one of {', '.join(LAUNCHERS)}"
        )
    return launcher != "local" and env.get(CHILD_ENV) != "1"


def command(
    launcher: str, nproc: int, master_port: int, args: list[str], extra: list[str] | None = None
) -> list[str]:
    """The runner command line that starts nproc copies of `python -m alignlab <args>`."""
    if nproc < 1:
        raise ConfigError(f"launcher.nproc={nproc} must be >= 1")
    extra = list(extra or [])
    if launcher == "deepspeed":
        # --no_local_rank: Hydra would reject the --local_rank=N argument the runner appends otherwise.
        runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
        return [
            *runner,
            "--master_port",
            str(master_port),
            "--no_local_rank",
            *extra,
            "--module",
            "alignlab",
            *args,
        ]
    if launcher == "torchrun":
        runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        return [*runner, "--master_port", str(master_port), *extra, "-m", "alignlab", *args]
    raise ValueError(f"launcher {launcher!r} does not relaunch")


def child_args(overrides: list[str], *, run_dir: str) -> list[str]:
    """The children's command line: this job's overrides with run_dir pinned to one absolute path."""
    return [o for o in overrides if not o.lstrip("+~").startswith("run_dir=")] + [f"run_dir={run_dir}"]


def child_env(nproc: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    env[CHILD_ENV] = "1"
    # N ranks on a CPU box must share its cores instead of each spawning a thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


# DeepSpeed's CPU allreduce (its shm_comm op, used when every rank is on one machine) maps one shared-memory file
# per rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (66 MB each), and never
# unlinks it (csrc/cpu/comm/shm.cpp defines shared_close but nothing calls it): every CPU run would leave
# 66 MB x ranks in RAM until reboot. The launcher removes its own run's files once the ranks have exited.
SHM_DIR = Path("/dev/shm")
SHM_BUFFER = re.compile(r"deepspeed_allreduce_buffer_(\d+)_(.+)_(\d+)_(\d+)")


def shm_buffers(shm_dir: Path = SHM_DIR, uid: int | None = None) -> list[tuple[Path, int]]:
    """This user's DeepSpeed allreduce buffers, each with its run's master port."""
    uid = os.getuid() if uid is None else uid
    if not shm_dir.is_dir():
        return []
    return [
        (p, int(m.group(3)))
        for p in shm_dir.iterdir()
        if (m := SHM_BUFFER.fullmatch(p.name)) and int(m.group(1)) == uid
    ]


def remove_shm_buffers(port: int, shm_dir: Path = SHM_DIR, uid: int | None = None) -> list[Path]:
    """Delete this user's DeepSpeed allreduce buffers of the run whose master port was `port`; returns them."""
    removed = []
    for path, p in shm_buffers(shm_dir, uid):
        if p == port:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def stale_shm_buffers(
    shm_dir: Path = SHM_DIR, proc_dir: Path = Path("/proc"), uid: int | None = None
) -> list[Path]:
    """This user's DeepSpeed allreduce buffers that no process maps: left by runs before the launcher removed them,
    or by runs killed with their launcher. Only reported: a run starting this instant may not have mapped its own
    yet, so deleting them here could hang it."""
    ours = [path for path, _ in shm_buffers(shm_dir, uid)]
    if not ours:
        return []
    mapped = set()
    for maps in proc_dir.glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            for line in maps.read_text().splitlines():
                if "deepspeed_allreduce_buffer_" in line:
                    mapped.add(Path(line.split(maxsplit=5)[-1].removesuffix(" (deleted)")).name)
    return [p for p in ours if p.name not in mapped]


def stale_build_locks(root: Path | None = None, min_age_s: float = 600.0) -> list[Path]:
    """torch's JIT-build locks (DeepSpeed builds its CPU ops on first use) older than min_age_s: a build killed
    mid-way leaves its lock, and every later start waits on it forever. A build takes well under a minute here."""
    if root is None:
        env = os.environ.get("TORCH_EXTENSIONS_DIR")
        root = Path(env) if env else Path.home() / ".cache" / "torch_extensions"
    if not root.is_dir():
        return []
    old = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        with contextlib.suppress(FileNotFoundError):  # a build that ends now removes its lock
            if time.time() - lock.stat().st_mtime > min_age_s:
                old.append(lock)
    return old


def warn_about_leftovers() -> None:
    """Before a launch: the two things earlier runs can leave behind that slow or hang this one."""
    for lock in stale_build_locks():
        log.warning(
            "%s is a torch extension build lock from %s: a build killed mid-way leaves it, and DeepSpeed then waits "
            "on it forever. If no build is running, remove it: rm %s",
            lock, time_ago(lock), lock,
        )  # fmt: skip
    stale = stale_shm_buffers()
    if stale:
        gb = sum(p.stat().st_size for p in stale if p.exists()) / 1e9
        log.warning(
            "%d DeepSpeed allreduce buffers in %s (%.1f GB of RAM) are mapped by no process: left by earlier runs. "
            "Remove them when no DeepSpeed job is starting: rm %s/deepspeed_allreduce_buffer_%d_*",
            len(stale), SHM_DIR, gb, SHM_DIR, os.getuid(),
        )  # fmt: skip


def time_ago(path: Path) -> str:
    minutes = (time.time() - path.stat().st_mtime) / 60
    return f"{minutes:.0f} minutes ago" if minutes < 120 else f"{minutes / 60:.1f} hours ago"


def is_rank(cmdline: list[str]) -> bool:
    """A rank's command line runs `python [-u] -m alignlab`; the runners' first -m names their own module."""
    modules = [cmdline[i + 1] for i, a in enumerate(cmdline[:-1]) if a == "-m"]
    return bool(modules) and modules[0] == "alignlab"


def rank_processes(pid: int) -> list[int]:
    """The pids of the ranks a runner (DeepSpeed's, torchrun) started under pid."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if is_rank(child.cmdline()):
                ranks.append(child.pid)
    return ranks


def relaunch(launcher_cfg, args: list[str]) -> int:
    """Run the stage on launcher_cfg.nproc processes and return the runner's exit code."""
    warn_about_leftovers()
    port = launcher_cfg.master_port or free_port()
    cmd = command(launcher_cfg.name, launcher_cfg.nproc, port, args, list(launcher_cfg.extra_args))
    log.info("launching %d processes: %s", launcher_cfg.nproc, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=child_env(launcher_cfg.nproc), start_new_session=True)

    def to_ranks(signum: int) -> None:
        # A scheduler's SIGTERM/SIGUSR1/SIGUSR2 goes to the ranks only: they checkpoint and exit 75, and the runner
        # passes that code on. Signalled itself, DeepSpeed's runner would die (USR1/USR2) or kill the ranks
        # mid-save (TERM). Ctrl-C goes to the whole group.
        ranks = rank_processes(proc.pid) if signum != signal.SIGINT else []
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not ranks:
            os.killpg(proc.pid, signum)

    try:
        with forward_signals(to_ranks):
            code = proc.wait()
    finally:
        # once the ranks are gone (an interrupted wait leaves them to the process group)
        if proc.poll() is not None and (removed := remove_shm_buffers(port)):
            log.debug("removed %d DeepSpeed shared-memory buffers", len(removed))
    if code != 0:
        log.error("the %s launcher exited with code %d", launcher_cfg.name, code)
    return code
