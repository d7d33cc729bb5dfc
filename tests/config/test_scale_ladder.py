"""TinyHH's scale ladder (experiment=tinyhh_10m, tinyhh_40m): the default world and tokenizer, models of about 10M
and 40M parameters built by the builder stage=pretrain uses, each in its own runs/<experiment>/ so the default
model's runs are never touched."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from alignlab import models
from tests.config.test_compose import compose_cfg

# experiment -> (fewest, most) parameters; the default 1.1M model pinned exactly
LADDER = {"tinyhh": (1_115_264, 1_115_264), "tinyhh_10m": (9.5e6, 11.5e6), "tinyhh_40m": (36e6, 42e6)}


class Vocabulary:
    """What build_llama reads from a tokenizer: its length and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def built_parameters(cfg) -> int:
    """Parameters of model.arch as stage=pretrain builds it, on the meta device (no memory, no time)."""
    tokenizer = Vocabulary(cfg.data.tinyhh.vocab_size)  # TinyHH's tokenizer has exactly this many tokens
    with torch.device("meta"):
        return models.count_parameters(models.llama_from_arch(tokenizer, cfg.model.arch))


@pytest.mark.parametrize("experiment", sorted(LADDER))
def test_each_rung_has_its_size_and_its_own_runs(experiment):
    cfg = compose_cfg("stage=pretrain", f"experiment={experiment}")
    low, high = LADDER[experiment]
    assert low <= built_parameters(cfg) <= high
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["run_dir"].endswith(f"/{experiment}/pretrain")
    assert resolved["data"] == OmegaConf.to_container(compose_cfg("stage=pretrain").data, resolve=True)
    assert cfg.stage.seq_len <= cfg.model.arch.max_position_embeddings
    # later stages start from this rung's own base model
    sft = OmegaConf.to_container(compose_cfg("stage=sft", f"experiment={experiment}"), resolve=True)
    assert sft["stage"]["init_from"].endswith(f"/{experiment}/pretrain/model")


@pytest.mark.parametrize("experiment", ["tinyhh_10m", "tinyhh_40m"])
def test_the_scale_benchmark_runs_each_rung_at_its_size(experiment):
    """scripts/bench/bench_scale.py embeds the trained default model in each rung's shape (common.widen_llama): the
    same parameter count as the rung's own model (only the head split differs), read from the same config."""
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import bench_scale
    import common

    cfg = compose_cfg("stage=pretrain", f"experiment={experiment}")
    arch = bench_scale.rung_arch(experiment.removeprefix("tinyhh_"))
    assert arch.items() <= OmegaConf.to_container(cfg.model.arch).items()  # the shape; defaults for the rest
    default = models.llama_from_arch(
        Vocabulary(cfg.data.tinyhh.vocab_size), compose_cfg("stage=pretrain").model.arch
    )
    wide = common.widen_llama(
        default, arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"]
    )
    assert models.count_parameters(wide) == built_parameters(cfg)
