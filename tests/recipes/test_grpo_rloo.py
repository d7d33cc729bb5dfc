"""stage=grpo and stage=rloo end to end on TinyHH from the session's SFT model and reward model: PPO's recipe with
K samples per prompt, a group baseline and no critic (docs/grpo.md).

One short GRPO run is both the contract check and the uninterrupted run the resume test compares with; the
session's RLOO run (tests/conftest.py) shows the reward-side KL penalty.
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from alignlab.tracking import read_metrics
from tests.conftest import run_stage
from tests.recipes.test_resume import assert_preempted, comparable, terminate_at

pytestmark = pytest.mark.slow

GRPO_SHORT = [
    "stage=grpo",
    "stage.iterations=6",
    "stage.rollout_batch_size=32",  # 8 prompts x K = 4
    "stage.minibatch_size=16",
    "stage.micro_batch_size=8",
    "stage.eval_prompts=16",
    "stage.eval_every=3",
    "stage.checkpoint_every=2",
    "stage.samples_every=2",
    "stage.samples_per_table=32",
    "stage.sample_eval=0",
]


def per_iteration(rows):
    return [r for r in rows if "ppo/score" in r]


@pytest.fixture(scope="module")
def grpo(tinyhh_rm, tinyhh_root, data_cache):
    run_stage(tinyhh_root, data_cache, *GRPO_SHORT, "stage.name=grpo_whole")
    return tinyhh_root / "runs" / "tinyhh" / "grpo_whole"


def test_grpo_samples_groups_trains_no_critic_and_puts_the_kl_in_the_loss(grpo):
    stage = OmegaConf.load(grpo / "config.yaml").stage
    assert (stage.advantage, stage.group_size, stage.kl_penalty, stage.kl_coef) == ("grpo", 4, "loss", 0.04)
    rows = read_metrics(grpo)
    its = per_iteration(rows)
    assert [r["step"] for r in its] == list(range(1, 7))
    assert [r["step"] for r in rows if "eval/kl" in r] == [0, 3, 6]
    assert [r["eval/kl"] for r in rows if "eval/kl" in r][0] == 0.0  # policy == reference at the start
    for r in its:
        assert "ppo/kl_loss" in r and r["ppo/kl_loss"] >= 0  # the k3 estimate in the loss, never negative
        assert "ppo/value_loss" not in r and "ppo/explained_variance" not in r
        assert r["ppo/non_score_reward"] == 0.0  # the KL is in the loss, not in the reward
    assert its[-1]["ppo/kl_loss"] > 0  # the policy moved
    # K = 4 answers to each prompt, in a row: one group per prompt, and different answers within a group
    table = [json.loads(s) for s in (grpo / "samples.jsonl").read_text().splitlines()]
    first = [s for s in table if s["table"] == "train" and s["iteration"] == 1]
    prompts = [s["prompt"] for s in first]
    assert len(prompts) == 32 and all(len(set(prompts[i : i + 4])) == 1 for i in range(0, 32, 4))
    assert len(set(prompts)) == 8
    assert any(len({s["response"] for s in first[i : i + 4]}) > 1 for i in range(0, 32, 4))
    ckpt = grpo / "checkpoints" / "checkpoint-6"
    assert (ckpt / "actor").is_dir() and not (ckpt / "critic").exists()
    assert (grpo / "model" / "model.safetensors").exists()


def test_grpo_killed_and_resumed_matches_the_uninterrupted_run(grpo, tinyhh_root, data_cache):
    runs = tinyhh_root / "runs" / "tinyhh"
    cut = runs / "grpo_cut"
    overrides = [*GRPO_SHORT, "stage.name=grpo_cut", f"paths.runs={runs.parent}", f"paths.data={data_cache}"]
    step = assert_preempted(terminate_at(overrides, cut, 2, tinyhh_root), cut, 2)
    assert step < 6, "the run finished before the signal arrived"
    resumed = run_stage(tinyhh_root, data_cache, *GRPO_SHORT, "stage.name=grpo_cut", "resume=auto")
    assert f"(step {step})" in resumed.stderr
    assert comparable(cut) == comparable(grpo)  # scores, KL, losses, held-out evaluations at every iteration
    assert (cut / "model" / "model.safetensors").read_bytes() == (
        grpo / "model" / "model.safetensors"
    ).read_bytes()


def test_rloo_penalises_kl_in_the_reward_with_leave_one_out_advantages(tinyhh_rloo):
    # the session's RLOO run (tests/conftest.py; tests/science judges its answers)
    out = tinyhh_rloo
    stage = OmegaConf.load(out / "config.yaml").stage
    assert (stage.advantage, stage.kl_penalty, stage.kl_estimator) == ("rloo", "reward", "k1")
    its = per_iteration(read_metrics(out))
    assert len(its) == stage.iterations
    for r in its:
        assert "ppo/kl_loss" not in r and "ppo/value_loss" not in r
        # the penalty is in the reward: -beta x the summed KL of the batch
        assert r["ppo/non_score_reward"] == pytest.approx(-stage.kl_coef * r["ppo/kl"], rel=1e-4, abs=1e-7)
    assert its[-1]["ppo/kl"] > 0  # the policy moved
    assert not (out / "checkpoints" / f"checkpoint-{stage.iterations}" / "critic").exists()
