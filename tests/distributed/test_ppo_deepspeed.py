"""stage=ppo on 2 CPU processes (real DeepSpeed engines for actor and critic) under ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json

import pytest

from alignlab.config import PPOConfig
from alignlab.models import parameter_count
from alignlab.tracking import read_metrics
from tests.conftest import alignlab

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PPO = [
    "stage=ppo",
    "stage.iterations=2",
    "stage.rollout_batch_size=32",
    "stage.minibatch_size=16",
    "stage.micro_batch_size=4",
    "stage.eval_prompts=16",
    "stage.sample_eval=0",
    "stage.ptx_coef=1.0",  # the ptx micro-batches go through the same engines
]


def last(rows, key):
    return [r[key] for r in rows if key in r][-1]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_ppo_two_processes(tinyhh_rm, tinyhh_root, data_cache, tmp_path, zero):
    out = tmp_path / zero
    proc = alignlab(
        *PPO,
        "launcher=deepspeed",
        "launcher.nproc=2",
        f"deepspeed={zero}",
        f"paths.runs={tinyhh_root / 'runs'}",
        f"paths.data={data_cache}",
        f"run_dir={out}",
        cwd=tmp_path,
    )
    assert "world_size=2" in proc.stderr
    rows = read_metrics(out)
    per_iteration = [r for r in rows if "ppo/score" in r]
    assert [r["step"] for r in per_iteration] == [1, 2]  # rank 0 alone logs: each iteration once
    assert [r["eval/kl"] for r in rows if "eval/kl" in r][
        0
    ] == 0.0  # step 0 on both ranks: policy == reference
    assert last(rows, "eval/kl") != 0.0 and "ppo/ptx_loss" in per_iteration[-1]
    sft = tinyhh_root / "runs" / "tinyhh" / "sft" / "model" / "model.safetensors"
    assert (
        out / "model" / "model.safetensors"
    ).stat().st_size == sft.stat().st_size  # the full model, gathered
    shards = list((out / "checkpoints").glob("checkpoint-*/actor/*optim_states.pt"))
    assert len(shards) == 2  # one ZeRO optimizer shard per rank
    # training compute (compute.json): both ranks' episodes, whole models under ZeRO-3, ppo_epochs of training
    record = json.loads((out / "compute.json").read_text())
    policy = parameter_count(str(out / "model"))
    flops, tokens = record["parts"], record["tokens"]
    assert flops["rollout"] == 2 * policy * tokens["rollout"] and flops["reference"] == flops["rollout"]
    assert tokens["actor"] == tokens["rollout"] * PPOConfig().ppo_epochs
    assert flops["actor"] == 6 * policy * tokens["actor"] and flops["ptx"] > 0 and flops["critic"] > 0
    # episodes: 2 iterations x rollout_batch_size, each at least a prompt token and an answer token
    batch = int(next(o for o in PPO if o.startswith("stage.rollout_batch_size")).split("=")[1])
    assert tokens["rollout"] >= 2 * batch * 2
