"""The local SLURM cluster the slurm tests submit to, started once per session (tests/slurm/cluster.py)."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import ROOT, run_env
from tests.slurm.cluster import LocalSlurm, missing_requirements


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = missing_requirements()
    if missing:
        message = (
            f"a local SLURM cluster needs {', '.join(missing)}; install it with "
            "`DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge` (as root; .ci/run does)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)  # CI installs them: their absence is a broken CI, not a reason to skip
        pytest.skip(message)
    cluster = LocalSlurm(run_env())
    cluster.env["ALIGNLAB_PYTHON"] = sys.executable  # the templates' interpreter: the one running the tests
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
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
