"""Shared fixtures: the repo root, a quiet offline environment for subprocess runs, a stage runner, and the TinyHH
model chain (pretrain -> SFT -> RM -> PPO) trained once per session.

Parallel runs (pytest-xdist, `make test`): every worker has its own data cache and its own runs/ root, so no two
tests write one directory. The chain is the exception: it is trained once, by whichever worker needs it first, into
a shared root next to the workers' temp dirs, under a file lock with a "done" marker per stage; the other workers
wait on the lock and reuse it. A worker's runs/tinyhh/<stage> for a chain stage is a symlink to the shared run, so
the default init_from chain resolves exactly as in a sequential run. Without xdist the same code runs with one
process and a lock nobody else takes.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from tests.stage_server import StageServer

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # without pytest-xdist everything runs in one process
    LoadScopeScheduling = None

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("unit", "config", "recipes", "zoo", "distributed", "slurm", "science")


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


_server: StageServer | None = None


def stage_server() -> StageServer | None:
    """This process's fork server for stage runs (tests/stage_server.py), started on first use with the
    environment runs get then; None under ALIGNLAB_TEST_FORK=0 (every run a plain `python -m alignlab`)."""
    global _server
    if os.environ.get("ALIGNLAB_TEST_FORK", "1") == "0":
        return None
    if _server is None:
        _server = StageServer(run_env(), str(ROOT))
        atexit.register(_server.close)
    return _server


def alignlab(
    *overrides: str, cwd: Path, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `python -m alignlab <overrides>` in cwd; on failure show its output.

    The run is a child of the fork server, which has done the imports already; a run whose environment differs
    from the server's (a test set a variable that imports may read) is a plain subprocess.
    """
    env = run_env()
    server = stage_server()
    proc = server.run(list(overrides), str(cwd), env, timeout) if server else None
    if proc is None:
        proc = subprocess.run(
            [sys.executable, "-m", "alignlab", *overrides],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if check and proc.returncode != 0:
        pytest.fail(
            f"alignlab {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-8000:]}"
        )
    return proc


def run_stage(
    root: Path, data_cache: Path, *overrides: str, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """A stage with runs/ under root and the given data cache (so default init_from chains resolve)."""
    return alignlab(
        *overrides,
        f"paths.runs={root / 'runs'}",
        f"paths.data={data_cache}",
        cwd=root,
        check=check,
        timeout=timeout,
    )


# The session's SFT and RM runs; stage=pipeline in tests/science passes the same overrides, so it finds them
# finished (same resolved config in their done.json) and skips them.
SFT_OVERRIDES = ["stage.sample_eval=100"]
RM_OVERRIDES = ["stage.normalize_samples=128"]
# The session's PPO run (fewer iterations than the default), read by tests/recipes/test_ppo.py and skipped as
# finished by the reduced pipeline in tests/science. Its held-out evaluation at iteration PPO_MIDPOINT (which
# changes no update) is where test_ppo.py compares PPO-ptx, run that long, with it.
PPO_MIDPOINT = 25
PPO_SHORT = [
    "stage.iterations=50",
    f"stage.eval_every={PPO_MIDPOINT}",
    "stage.sample_eval=100",
    "stage.samples_every=10",
]
# The session's DPO and RLOO runs at their defaults (DPO one epoch, RLOO 100 iterations: at 50 its attack-set
# gain held on one machine's chain and not on another's), judged by stage=eval in tests/science's pipeline (which
# skips them as finished) and read by tests/recipes/test_dpo.py; no oracle judging of their own.
DPO_OVERRIDES = ["stage.sample_eval=0"]
RLOO_OVERRIDES = ["stage.sample_eval=0"]


# ---------------------------------------------------------------------------------------------------------------
# Workers: threads per worker, and the order and grouping of tests across workers


def xdist_worker_count() -> int:
    """How many xdist workers this session has (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_configure(config):
    # N workers on C cores: C // N threads each (at least 1), so they do not oversubscribe the cores. Stage
    # subprocesses inherit it through run_env(). ALIGNLAB_TEST_THREADS overrides.
    if "PYTEST_XDIST_WORKER" in os.environ:
        threads = os.environ.get("ALIGNLAB_TEST_THREADS") or str(
            max(1, (os.cpu_count() or 1) // xdist_worker_count())
        )
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = threads
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))


CHAIN_FIXTURES = ("tinyhh_root", "tinyhh_sft", "tinyhh_rm", "tinyhh_ppo", "tinyhh_dpo", "tinyhh_rloo")
# Longest tiers first (longest-processing-time-first keeps the workers' ends close); unit tests fill in last.
TIER_RANK = {"distributed": 0, "zoo": 1, "slurm": 2, "recipes": 3, "science": 3, "config": 4, "unit": 5}
SHARED_SCOPES = ("module", "class", "package")


def tier(item) -> str:
    parts = Path(str(item.path)).relative_to(ROOT).parts
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else ""


def shared_fixture_groups(items) -> dict[int, str]:
    """An xdist group for tests that share a module/class-scoped fixture (so the fixture runs on one worker, once).

    Tests of one module are joined (union-find) when they use a common fixture of that scope; a test that uses
    none stays on its own and may run on any worker.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    keys: dict[int, list[str]] = {}
    for i, item in enumerate(items):
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        module = item.nodeid.split("::", 1)[0]
        names = [
            f"{module}::{name}"
            for name, defs in info.name2fixturedefs.items()
            if defs and defs[-1].scope in SHARED_SCOPES and name in item.fixturenames
        ]
        if names:
            keys[i] = names
            for other in names[1:]:
                parent[find(other)] = find(names[0])
    return {i: find(names[0]) for i, names in keys.items()}


GROUPS_FILE = "xdist_groups.json"  # in the controller's base temp dir: {nodeid: group} from the workers


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # SLURM tests share one local cluster (tests/slurm/conftest.py): with --dist loadgroup they run on one worker.
    shared = shared_fixture_groups(items)
    groups = {}
    for i, item in enumerate(items):
        group = "slurm" if tier(item) == "slurm" else shared.get(i)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
            groups[item.nodeid] = group
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return  # one process: the collection order is the order to read failures in
    # xdist 3.8 marks a group by renaming the test's nodeid, which pytest >= 9.2 ignores (nodeid is derived from
    # the node's structured id): hand the groups to the controller's scheduler (GroupScheduling below) in a file
    path = Path(config._tmp_path_factory.getbasetemp()).parent / GROUPS_FILE
    tmp = path.with_name(f".{path.name}.{os.environ['PYTEST_XDIST_WORKER']}")
    tmp.write_text(json.dumps(groups))
    os.replace(tmp, path)  # every worker writes the same mapping (xdist checks the collections agree)

    def depth(item) -> int:  # how far down the chain a test needs: 0 (not at all) .. 4 (PPO)
        return max((k + 1 for k, f in enumerate(CHAIN_FIXTURES) if f in item.fixturenames), default=0)

    # The critical path first: a test at the end of the longest chain (in the whole suite, the science pipeline:
    # it trains pretrain -> SFT -> RM -> PPO, then runs the reduced pipeline), so the chain starts at once.
    deepest = max(map(depth, items), default=0)
    at_end = [item for item in items if deepest and depth(item) == deepest]
    starter = next((item for item in at_end if tier(item) == "science"), at_end[0] if at_end else None)

    def rank(indexed) -> tuple:
        i, item = indexed
        names = set(item.fixturenames)
        if item is starter:
            return (0, 0, 0, i)  # its group (module-scoped fixture) comes with it
        if tier(item) == "unit":
            return (3, 0, 0, i)  # many short tests: they even out the workers' ends
        if not names & set(CHAIN_FIXTURES):
            return (1, 0, TIER_RANK.get(tier(item), 3), i)  # independent of the chain: runs while it trains
        # Needs the chain, which the critical path has trained by the time these start. Groups first: they share a
        # run of their own (a module-scoped fixture: PPO-ptx, rejection sampling, ...), the longest work left, so
        # none of them starts last and leaves the other worker idle.
        return (2, 0 if item.nodeid in groups else 1, TIER_RANK.get(tier(item), 3), i)

    # every worker sorts the same collection the same way (xdist checks that the collections agree)
    items[:] = [item for _, item in sorted(enumerate(items), key=rank)]


if LoadScopeScheduling is not None:

    class GroupScheduling(LoadScopeScheduling):
        """--dist loadgroup with the groups the workers computed: every test of a group runs on one worker, in
        collection order; other tests are handed out one by one to whichever worker is free."""

        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):  # xdist's own suffix, where pytest keeps it
                return nodeid.split("@")[-1]
            if not hasattr(self, "_groups"):
                path = Path(self.config._tmp_path_factory.getbasetemp()) / GROUPS_FILE
                self._groups = json.loads(path.read_text()) if path.exists() else {}
            return self._groups.get(nodeid, nodeid)

    @pytest.hookimpl(optionalhook=True)  # a hook of xdist's: unknown under -p no:xdist
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadgroup":
            return GroupScheduling(config, log)
        return None


# ---------------------------------------------------------------------------------------------------------------
# The TinyHH chain, trained once per session


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """This worker's TinyHH data cache (generation is deterministic and takes seconds; a per-worker cache means
    no two processes ever generate one data set at the same time)."""
    return tmp_path_factory.mktemp("data_cache")


class SharedChain:
    """The chain's runs/ root, shared by every xdist worker of the session; each stage trained at most once.

    `ensure(stage, train)` takes the stage's file lock; the first caller trains it and writes `.<stage>.done`
    (or `.<stage>.failed` with the error, so the others fail at once instead of training it again).
    """

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data_cache"
        root.mkdir(parents=True, exist_ok=True)

    def run_dir(self, stage: str) -> Path:
        return self.root / "runs" / "tinyhh" / stage

    def ensure(self, stage: str, train: Callable[[], subprocess.CompletedProcess]) -> Path:
        done, failed = self.root / f".{stage}.done", self.root / f".{stage}.failed"
        with FileLock(str(self.root / f".{stage}.lock")):
            if failed.exists():
                pytest.fail(f"the session's {stage} run failed (in another worker):\n{failed.read_text()}")
            if not done.exists():
                try:
                    proc = train()
                except (Exception, pytest.fail.Exception) as e:
                    failed.write_text(str(e)[-12000:])
                    raise
                (self.root / f".{stage}.stdout").write_text(proc.stdout)
                (self.root / f".{stage}.stderr").write_text(proc.stderr)
                finished = json.loads((self.run_dir(stage) / "done.json").read_text())["finished"]
                done.write_text(json.dumps({"finished": finished}))
        return self.run_dir(stage)

    def output(self, stage: str, overrides: list[str]) -> subprocess.CompletedProcess:
        """The training run's output, as the worker that trained it saw it."""
        return subprocess.CompletedProcess(
            overrides,
            0,
            (self.root / f".{stage}.stdout").read_text(),
            (self.root / f".{stage}.stderr").read_text(),
        )

    def untouched(self) -> list[str]:
        """Chain stages whose done.json changed after the chain trained them (a test wrote into a shared run)."""
        bad = []
        for marker in self.root.glob(".*.done"):
            stage = marker.name[1:-5]
            done = self.run_dir(stage) / "done.json"
            expected = json.loads(marker.read_text())["finished"]
            if not done.exists() or json.loads(done.read_text())["finished"] != expected:
                bad.append(stage)
        return bad


@pytest.fixture(scope="session")
def tinyhh_chain(tmp_path_factory):
    """The shared chain root: next to the workers' base temp dirs under xdist, in the base temp dir without."""
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent
    chain = SharedChain(base / "tinyhh_chain")
    yield chain
    changed = chain.untouched()
    assert not changed, f"a test rewrote the session's shared {changed} run(s): use stage.name= or run_dir="


def link(root: Path, chain: SharedChain, stage: str) -> Path:
    """root/runs/tinyhh/<stage> -> the shared run (idempotent)."""
    path = root / "runs" / "tinyhh" / stage
    if not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(chain.run_dir(stage), target_is_directory=True)
    return path


@pytest.fixture(scope="session")
def tinyhh_root(tmp_path_factory, tinyhh_chain) -> Path:
    """This worker's runs/ root, holding the default TinyHH base model (the full ~5 minute pretraining, trained
    once per session for all workers; runs/tinyhh/pretrain links to it).

    Later stages run with paths.runs=<root>/runs so their default init_from chain finds it; what they write
    (under their own stage.name or run_dir) stays in this worker's root.
    """
    chain = tinyhh_chain
    chain.ensure(
        "pretrain",
        lambda: alignlab(
            "stage=pretrain",
            f"paths.runs={chain.root / 'runs'}",
            f"paths.data={chain.data}",
            cwd=chain.root,
            timeout=1800,  # ~5 minutes alone on 2 cores; with a thread per worker and other tests running, longer
        ),
    )
    root = tmp_path_factory.mktemp("tinyhh")
    link(root, chain, "pretrain")
    return root


@pytest.fixture(scope="session")
def tinyhh_sft(tinyhh_root, tinyhh_chain) -> Path:
    """The default SFT model on the session's base model (stage=sft, ~1 minute), trained once per session."""
    chain = tinyhh_chain
    chain.ensure("sft", lambda: run_stage(chain.root, chain.data, "stage=sft", *SFT_OVERRIDES))
    return link(tinyhh_root, chain, "sft")


@pytest.fixture(scope="session")
def tinyhh_rm(tinyhh_sft, tinyhh_root, tinyhh_chain) -> tuple[Path, subprocess.CompletedProcess]:
    """The default reward model on that SFT model (stage=rm, ~1.5 minutes), with its normalisation, and the
    output of the run that trained it."""
    chain = tinyhh_chain
    chain.ensure("rm", lambda: run_stage(chain.root, chain.data, "stage=rm", *RM_OVERRIDES))
    return link(tinyhh_root, chain, "rm"), chain.output("rm", RM_OVERRIDES)


@pytest.fixture(scope="session")
def tinyhh_ppo(tinyhh_rm, tinyhh_root, tinyhh_chain) -> Path:
    """stage=ppo with PPO_SHORT on that SFT model and RM (~2 minutes), trained once per session."""
    chain = tinyhh_chain
    chain.ensure("ppo", lambda: run_stage(chain.root, chain.data, "stage=ppo", *PPO_SHORT, timeout=1500))
    return link(tinyhh_root, chain, "ppo")


@pytest.fixture(scope="session")
def tinyhh_dpo(tinyhh_sft, tinyhh_root, tinyhh_chain) -> Path:
    """stage=dpo with its defaults on that SFT model (one epoch, ~1 minute), trained once per session."""
    chain = tinyhh_chain
    chain.ensure("dpo", lambda: run_stage(chain.root, chain.data, "stage=dpo", *DPO_OVERRIDES, timeout=1500))
    return link(tinyhh_root, chain, "dpo")


@pytest.fixture(scope="session")
def tinyhh_rloo(tinyhh_rm, tinyhh_root, tinyhh_chain) -> Path:
    """stage=rloo with RLOO_OVERRIDES on that SFT model and RM (~3 minutes), trained once per session."""
    chain = tinyhh_chain
    chain.ensure(
        "rloo", lambda: run_stage(chain.root, chain.data, "stage=rloo", *RLOO_OVERRIDES, timeout=1500)
    )
    return link(tinyhh_root, chain, "rloo")
