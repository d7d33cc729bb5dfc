"""A throwaway SLURM cluster on this machine: its own munged, slurmctld and slurmd(s), config and state.

Everything lives in one temporary directory (its own munge key and socket, free TCP ports, no accounting
database), so it neither needs nor touches a system SLURM or munge, and two test sessions can run side by side.
One node is localhost; with nodes=2 every slurmd runs in a network namespace of its own
(tests/slurm/netns.py), so that the ranks of a job on two nodes talk over a network, not over one loopback.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.slurm.netns import NodeNetwork

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
# Daemons live in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
# More CPUs than the machine has (slurmd accepts the declaration with SlurmdParameters=config_overrides): the
# tests' ranks are tiny, and a 2-job x 2-rank sweep should run at once on a 2-core CI machine.
CPUS = 4
NODE = "localhost"  # resolvable everywhere: the templates use the first node's name as MASTER_ADDR


def missing_requirements(nodes: int = 1) -> list[str]:
    """What this machine lacks to run the cluster (empty when it can)."""
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b, path=SEARCH_PATH) is None]
    if os.geteuid() != 0:
        missing.append("root (slurmd starts jobs as their user)")
    elif nodes > 1:
        missing += NodeNetwork.missing_requirements()
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In a daemon's child process before exec: SIGTERM when the test process dies, even by SIGKILL, instead of
    a daemon left running (the flag survives the exec chain nsenter -> unshare -> sh -> slurmd)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


SLURM_CONF = """\
ClusterName=alignlabtest
SlurmctldHost={host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our munged's socket; a requeued job may start again once its credential expired (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={root}/state
# %n: the node's name, one directory and log per slurmd
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/spool/%n/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
# one line per task: job, step, rank and the node it really ran on (LocalSlurm.tasks)
TaskProlog={root}/task_prolog.sh
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
{node_lines}
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP
"""

# Runs as the task's user in the task's environment before every task (the batch script's included);
# `hostname` is the node's own name in a namespaced node (its UTS namespace).
TASK_PROLOG = """\
#!/bin/sh
echo "$SLURM_JOB_ID ${{SLURM_STEP_ID:-batch}} ${{SLURM_PROCID:-0}} $SLURMD_NODENAME $(hostname)" >> {log}
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

    def __init__(self, base_env: dict[str, str], nodes: int = 1):
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
        # one node is localhost; more are node1, node2, ..., each in its own network namespace
        self.nodes = [NODE] if nodes == 1 else [f"node{i}" for i in range(1, nodes + 1)]
        self.network = NodeNetwork(self.nodes, self.root) if nodes > 1 else None

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
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={self.munge_socket}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        )
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged to create its socket")
        if self.network:
            self.network.start()
        prolog = self.root / "task_prolog.sh"
        prolog.write_text(TASK_PROLOG.format(log=self.root / "log" / "tasks.log"))
        prolog.chmod(0o755)
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname().split(".")[0],
                ctld_addr=self.network.controller_addr if self.network else "127.0.0.1",
                ctld_port=free_port(),
                slurmd_port=free_port(),
                munge_socket=self.munge_socket,
                root=self.root,
                node_lines="\n".join(
                    f"NodeName={node} NodeAddr={self._address(node)} CPUs={CPUS} State=UNKNOWN"
                    for node in self.nodes
                ),
                nodes=",".join(self.nodes),
            )
        )
        # -D: stay in the foreground (our child, stopped by its pid); -c: no state from an earlier run
        self._spawn("slurmctld", "slurmctld", "-D", "-c", "-f", str(self.conf))
        for node in self.nodes:
            (self.root / "spool" / node).mkdir()
            self._spawn(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(self.conf), node=node)
        self._wait_for(self._nodes_idle, timeout, f"nodes {','.join(self.nodes)} to become idle")
        return self

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # jobs' slurmstepd processes are not the daemons' children: cancel them before the daemons go
            self.run("scancel", "--partition=debug", check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.5)
        for name in reversed(list(self.procs)):  # slurmds, slurmctld, then munged
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if self.network:
            self.network.stop()  # also when start failed half-way: it removes what exists
        shutil.rmtree(self.root, ignore_errors=True)

    def _address(self, node: str) -> str:
        return self.network.address(node) if self.network else "127.0.0.1"

    def _spawn(self, name: str, exe: str, *args: str, node: str | None = None) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        argv = [shutil.which(exe, path=SEARCH_PATH), *args]
        if node and self.network:
            argv = self.network.command(node, *argv)
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, preexec_fn=die_with_parent
        )

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return out[1::2] == ["idle"] * len(self.nodes)

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
    def tasks(self, job_id: str) -> list[dict[str, str]]:
        """The tasks the job started so far (the batch script's too, step "batch"), from the task prolog's log:
        step, rank, the node SLURM placed it on and the hostname it saw there."""
        log = self.root / "log" / "tasks.log"
        lines = log.read_text().splitlines() if log.exists() else []
        rows = [
            dict(zip(("job", "step", "rank", "node", "hostname"), line.split(), strict=True))
            for line in lines
        ]
        return [row for row in rows if row["job"] == job_id]

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
