"""The network of tests/slurm/cluster.py's multi-node cluster: one network namespace per node on a host bridge.

Every node gets a namespace (loopback up, one veth link to a bridge on the host) and an address in a /24 of its
own; the host side of the bridge is the controller's address. A node's daemons run (`command`) in its namespace,
in a UTS namespace whose hostname is the node's name, and with /etc/hosts replaced by the cluster's hosts file (a
bind mount in a mount namespace of their own, invisible outside it): as on a real
cluster, every node resolves every node's name, and its own hostname to its own address. Names carry this
process's pid, so two test sessions coexist, and whatever a killed session left behind is removed by the next.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

NETWORK = "10.213"  # the /24s are 10.213.<n>.0: private, and rarely a real network's
# namespaces alignlab-<pid>x<k>-<node>; host links alb<pid>x<k> (bridge) and alv<pid>x<k>n<i> (veth, <= 15 chars)
STALE_NAMESPACE = re.compile(r"^alignlab-(\d+)x\d+-")
STALE_LINK = re.compile(r"^al[bv](\d+)x\d+")
NETNS_DIR = "/var/run/netns"  # where `ip netns add` mounts a namespace (iproute2's NETNS_RUN_DIR)
_instances = itertools.count()
_live: set[str] = set()  # this process's namespaces and links (a killed session's pid may come back as ours)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale(name: str, pattern: re.Pattern) -> bool:
    m = pattern.match(name)
    if not m or name in _live:
        return False
    pid = int(m.group(1))
    return pid == os.getpid() or not alive(pid)


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]


def kill_namespace(ns: str) -> None:
    """Stop what still runs in ns (a job's leftovers, a killed session's slurmd), then remove it."""
    for pid in ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    ip("netns", "del", ns, check=False)


def remove_stale() -> None:
    for ns in namespaces():
        if stale(ns, STALE_NAMESPACE):
            kill_namespace(ns)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if stale(name, STALE_LINK):
            ip("link", "del", name, check=False)


class NodeNetwork:
    def __init__(self, nodes: list[str], root: Path):
        tag = f"{os.getpid()}x{next(_instances)}"
        self.nodes = nodes
        self.bridge = f"alb{tag}"
        self.namespaces = {node: f"alignlab-{tag}-{node}" for node in nodes}
        self.links = {node: f"alv{tag}n{i}" for i, node in enumerate(nodes, 1)}
        self.hosts = root / "hosts"
        self.subnet = ""

    @staticmethod
    def missing_requirements() -> list[str]:
        """What this machine lacks to give nodes namespaces of their own (empty when it can)."""
        missing = [b for b in ("ip", "nsenter", "unshare", "mount", "hostname") if shutil.which(b) is None]
        if missing:
            return missing
        probe = f"alignlab-{os.getpid()}x-probe"
        made = ip("netns", "add", probe, check=False)
        ip("netns", "del", probe, check=False)
        if made.returncode != 0:
            return [f"network namespaces (`ip netns add` failed: {made.stderr.strip()})"]
        return []

    @property
    def controller_addr(self) -> str:
        return f"{self.subnet}.254"

    def address(self, node: str) -> str:
        return f"{self.subnet}.{self.nodes.index(node) + 1}"

    def start(self) -> NodeNetwork:
        remove_stale()
        self.subnet = self._free_subnet()
        _live.add(self.bridge)
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for node in self.nodes:
            ns, link = self.namespaces[node], self.links[node]
            _live.update((ns, link))
            ip("netns", "add", ns)
            # the peer is created inside the namespace: no host-side name to collide with
            ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", link, "master", self.bridge)
            ip("link", "set", link, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        names = ["127.0.0.1 localhost", f"{self.controller_addr} {socket.gethostname()}"]
        names += [f"{self.address(node)} {node}" for node in self.nodes]
        self.hosts.write_text("\n".join(names) + "\n")
        return self

    def command(self, node: str, *argv: str) -> list[str]:
        """argv run on node: in its network namespace, with its hostname and the cluster's /etc/hosts."""
        # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the /sys/fs/cgroup slurmd reads;
        # unshare --mount: a private mount namespace, so the /etc/hosts bind mount is the node's alone
        enter = ["nsenter", f"--net={NETNS_DIR}/{self.namespaces[node]}", "unshare", "--mount", "--uts", "--"]
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        return [*enter, "sh", "-c", script, "node", str(self.hosts), node, *argv]

    def stop(self) -> None:
        """Remove the namespaces (and what still runs in them) and the links; safe after a partial start."""
        present = set(namespaces())
        for ns in self.namespaces.values():
            if ns in present:
                kill_namespace(ns)
        for link in (*self.links.values(), self.bridge):
            ip("link", "del", link, check=False)  # a veth goes with its namespace: usually gone already
        _live.difference_update((*self.namespaces.values(), *self.links.values(), self.bridge))

    def _free_subnet(self) -> str:
        used = ip("-4", "-o", "addr", "show", check=False).stdout + ip("-4", "route", check=False).stdout
        for k in range(254):
            subnet = f"{NETWORK}.{(os.getpid() + k) % 254 + 1}"
            if f"{subnet}." not in used:
                return subnet
        raise RuntimeError(f"no free {NETWORK}.<n>.0/24 for the cluster's network:\n{used}")
