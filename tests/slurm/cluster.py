"""A throwaway one-node SLURM cluster on localhost: its own munged, slurmctld and slurmd, config and state.

Everything lives in one temporary directory (its own munge key and socket, free TCP ports, no accounting
database), so it neither needs nor touches a system SLURM or munge, and two test sessions can run side by side.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
# Daemons live in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
# More CPUs than the machine has (slurmd accepts the declaration with SlurmdParameters=config_overrides): the
# tests' ranks are tiny, and a 2-job x 2-rank sweep should run at once on a 2-core CI machine.
CPUS = 4
NODE = "localhost"  # resolvable everywhere: the templates use the first node's name as MASTER_ADDR


def missing_requirements() -> list[str]:
    """What this machine lacks to run the cluster (empty when it can)."""
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b, path=SEARCH_PATH) is None]
    if os.geteuid() != 0:
        missing.append("root (slurmd starts jobs as their user)")
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=alignlabtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our munged's socket; a requeued job may start again once its credential expired (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# no cgroups: works in containers and VMs alike
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
# finished jobs stay visible to `scontrol show job` (there is no sacct without accounting)
MinJobAge=900
JobRequeue=1
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Job:
    """`scontrol show job` of one job, as key=value pairs."""

    id: str
    info: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return self.info.get("JobState", "UNKNOWN")

    @property
    def restarts(self) -> int:
        return int(self.info.get("Restarts", 0))


class LocalSlurm:
    FINISHED = {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }

    def __init__(self, base_env: dict[str, str]):
        # munged wants every directory above its socket to be world-executable: not pytest's 0700 tmp dirs
        self.root = Path(tempfile.mkdtemp(prefix="alignlab-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.sock"
        self.procs: dict[str, subprocess.Popen] = {}
        # the test session's environment minus any SLURM job it may itself run in (and stray rank variables)
        drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        self.env = {k: v for k, v in base_env.items() if not k.startswith("SLURM_") and k not in drop}
        self.env["SLURM_CONF"] = str(self.conf)
        self.env["PATH"] = SEARCH_PATH

    # ------------------------------------------------------------------------------------------- life cycle
    def start(self, timeout: float = 60) -> LocalSlurm:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir()
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))  # a private key for this cluster only; the system's stays untouched
        key.chmod(0o400)
        self._spawn(
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={self.munge_socket}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        )
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged to create its socket")
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname().split(".")[0],
                ctld_port=free_port(),
                slurmd_port=free_port(),
                munge_socket=self.munge_socket,
                root=self.root,
                node=NODE,
                cpus=CPUS,
            )
        )
        # -D: stay in the foreground (our child, stopped by its pid); -c: no state from an earlier run
        self._spawn("slurmctld", "-D", "-c", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-N", NODE, "-f", str(self.conf))
        self._wait_for(self._node_idle, timeout, f"node {NODE} to become idle")
        return self

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # jobs' slurmstepd processes are not the daemons' children: cancel them before the daemons go
            self.run("scancel", "--partition=debug", check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.5)
        for name in reversed(list(self.procs)):  # slurmd, slurmctld, then munged
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        exe = shutil.which(name, path=SEARCH_PATH)
        self.procs[name] = subprocess.Popen([exe, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-n", NODE, "-o", "%t", check=False).stdout.strip()
        return out == "idle"

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({proc.returncode}) while waiting for {what}\n{self.logs()}"
                    )
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------------------ jobs
    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None, timeout: float = 60):
        proc = subprocess.run(cmd, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, *args: str, cwd: Path) -> str:
        """Submit; returns the job id."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Job:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        info = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return Job(job_id, info)

    def wait(self, job_id: str, timeout: float, log: Path | None = None) -> Job:
        """Wait until the job has finished (requeues included); on timeout cancel it and say what it was doing."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if job.state in self.FINISHED:
                return job
            time.sleep(1)
        job = self.job(job_id)
        self.run("scancel", job_id, check=False)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log and log.exists() else ""
        raise TimeoutError(
            f"job {job_id} not finished after {timeout:.0f}s (state {job.state}, reason "
            f"{job.info.get('Reason')}):\n{tail}\n{self.logs()}"
        )
