"""The local SLURM cluster the slurm tests submit to, started once per session (tests/slurm/cluster.py)."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import ROOT, run_env
from tests.slurm.cluster import LocalSlurm, missing_requirements


def local_slurm(nodes: int):
    """A started LocalSlurm of `nodes` nodes for the session; skipped without its requirements, except under
    CI=true, where they are installed: their absence is a broken CI, not a reason to skip."""
    missing = missing_requirements(nodes)
    if missing:
        packages = "slurm-wlm munge" + (" iproute2 util-linux" if nodes > 1 else "")
        message = (
            f"a local {nodes}-node SLURM cluster needs {', '.join(missing)}; install it with "
            f"`DEBIAN_FRONTEND=noninteractive apt-get install -y {packages}` (as root; .ci/run installs SLURM)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    cluster = LocalSlurm(run_env(), nodes=nodes)
    cluster.env["ALIGNLAB_PYTHON"] = sys.executable  # the templates' interpreter: the one running the tests
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = local_slurm(nodes=1)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_two_nodes():
    """Two nodes, each slurmd in a network namespace of its own (tests/slurm/netns.py); may run next to
    slurm_cluster: each cluster binds its own free ports, and the nodes' ports live in their namespaces."""
    cluster = local_slurm(nodes=2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def quick_data(data_cache):
    """The session's data cache with experiment=quick's TinyHH data already generated, so that jobs running at
    the same time (a sweep) only read it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from alignlab.config import register_configs
    from alignlab.tinyhh.emitters import Sizes, ensure

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=pretrain", "experiment=quick"])
    ensure(data_cache, Sizes(**OmegaConf.to_container(cfg.data.tinyhh)))
    return data_cache
