"""stage=sft, stage=rm and stage=dpo (TRL trainers on the shared DeepSpeed engine) on 2 CPU processes against 1
process."""

from __future__ import annotations

import json

import pytest

from alignlab.models import parameter_count
from alignlab.tracking import read_metrics
from tests.conftest import alignlab

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def last(rows, key):
    return [r[key] for r in rows if key in r][-1]


def per_token(run_dir, part: str) -> float:
    """compute.json's FLOPs per trained token of one part (alignlab/compute.py)."""
    record = json.loads((run_dir / "compute.json").read_text())
    return record["parts"][part] / record["tokens"][part]


def run(root, data_cache, tmp, name, *overrides):
    out = tmp / name
    proc = alignlab(
        *overrides, f"paths.runs={root / 'runs'}", f"paths.data={data_cache}", f"run_dir={out}", cwd=tmp
    )
    return out, proc


SFT = [
    "stage=sft",
    "stage.steps=12",
    "stage.batch_size=32",
    "stage.micro_batch_size=16",
    "stage.sample_eval=0",
]


@pytest.fixture(scope="module")
def sft_one(tinyhh_root, data_cache, tmp_path_factory):
    """The 1-process run both ZeRO stages are compared with (trained once)."""
    return run(tinyhh_root, data_cache, tmp_path_factory.mktemp("sft_one"), "one", *SFT)[0]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_sft_two_processes_match_one(tinyhh_root, data_cache, tmp_path, sft_one, zero):
    one = sft_one
    two, proc = run(
        tinyhh_root,
        data_cache,
        tmp_path,
        "two",
        *SFT,
        "launcher=deepspeed",
        "launcher.nproc=2",
        f"deepspeed={zero}",
    )
    assert "world_size=2" in proc.stderr
    a, b = read_metrics(one), read_metrics(two)
    assert [sorted(k for k in r if not k.startswith("perf/") and k != "train/grad_norm") for r in a] == [
        sorted(k for k in r if not k.startswith("perf/") and k != "train/grad_norm") for r in b
    ]  # rank 0 alone logs: the same rows once
    assert last(b, "eval/answer_loss") < last(b, "eval/answer_loss_start")
    assert abs(last(a, "eval/answer_loss") - last(b, "eval/answer_loss")) < 0.03 * last(a, "eval/answer_loss")
    assert (two / "model" / "model.safetensors").stat().st_size == (
        one / "model" / "model.safetensors"
    ).stat().st_size
    # training compute: every rank's tokens counted (the same rows in all, in other batches), and the whole model's
    # parameters under ZeRO-3's partitions too: 6 x parameters per token
    tokens = [json.loads((d / "compute.json").read_text())["tokens"]["train"] for d in (one, two)]
    assert abs(tokens[1] - tokens[0]) < 0.05 * tokens[0]
    assert per_token(two, "train") == per_token(one, "train") == 6 * parameter_count(str(one / "model"))


def test_rm_two_processes_zero2(tinyhh_root, data_cache, tmp_path):
    base = str(tinyhh_root / "runs" / "tinyhh" / "pretrain" / "model")
    common = [
        "stage=rm",
        f"stage.init_from={base}",
        "stage.steps=30",
        "stage.normalize_samples=0",
        "stage.lr=3e-4",
    ]
    one, _ = run(tinyhh_root, data_cache, tmp_path, "one", *common)
    two, proc = run(
        tinyhh_root,
        data_cache,
        tmp_path,
        "two",
        *common,
        "launcher=deepspeed",
        "launcher.nproc=2",
        "deepspeed=zero2",
    )
    assert "world_size=2" in proc.stderr
    a, b = read_metrics(one), read_metrics(two)
    assert last(b, "rm/accuracy") > 0.7  # it learned
    assert abs(last(a, "rm/accuracy") - last(b, "rm/accuracy")) <= 0.05
    assert abs(last(a, "train/loss") - last(b, "train/loss")) < 0.1 * last(a, "train/loss") + 0.02


def test_dpo_two_processes_zero3_match_one(tinyhh_sft, tinyhh_root, data_cache, tmp_path):
    # ZeRO-3: the policy's parameters are sharded, and TRL's frozen reference copy is prepared on the same engine
    common = [
        "stage=dpo",
        "stage.steps=10",
        "stage.batch_size=32",
        "stage.micro_batch_size=16",
        "stage.eval_rows=32",
        "stage.lr=5e-5",
        "stage.sample_eval=0",
    ]
    one, _ = run(tinyhh_root, data_cache, tmp_path, "one", *common)
    two, proc = run(
        tinyhh_root,
        data_cache,
        tmp_path,
        "two",
        *common,
        "stage.micro_batch_size=8",
        "launcher=deepspeed",
        "launcher.nproc=2",
        "deepspeed=zero3",
    )
    assert "world_size=2" in proc.stderr
    a, b = read_metrics(one), read_metrics(two)
    assert last(b, "eval/reward_margin") > 0 and last(a, "eval/reward_margin") > 0  # both learned
    assert abs(last(a, "eval/loss") - last(b, "eval/loss")) < 0.03 * last(a, "eval/loss")
    assert abs(last(a, "eval/reward_accuracy") - last(b, "eval/reward_accuracy")) <= 0.1
    assert (two / "model" / "model.safetensors").stat().st_size == (
        one / "model" / "model.safetensors"
    ).stat().st_size  # the full policy, gathered from the shards
    # training compute: 6 x parameters per trained token and the reference's 2 x, with ZeRO-3's shards counted whole
    params = parameter_count(str(one / "model"))
    assert per_token(two, "train") == per_token(one, "train") == 6 * params
    assert per_token(two, "reference") == 2 * params
