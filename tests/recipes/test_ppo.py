"""stage=ppo and stage=ppo_ptx end to end on TinyHH from the session's SFT model and reward model.

A short run asserts the direction the full run (docs/results.md) shows at scale: PPO raises the reward model's
score on held-out prompts with bounded KL and makes the policy more harmless than the SFT model it started from;
PPO-ptx ends with a lower pretraining loss than PPO at similar reward, after the same number of iterations.
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from alignlab import models
from alignlab.tracking import read_metrics
from tests.conftest import PPO_MIDPOINT, PPO_SHORT, run_stage

pytestmark = pytest.mark.slow

# The recipe-test run: fewer iterations than the default (docs/results.md has the full run), same code paths.
SHORT = PPO_SHORT


def last(rows, key):
    return [r[key] for r in rows if key in r][-1]


def trained_score(rows, which):
    """Mean RM score of the rollouts of the first or the last 10 iterations (640 episodes)."""
    scores = [r["ppo/score"] for r in rows if "ppo/score" in r]
    window = scores[:10] if which == "first" else scores[-10:]
    return sum(window) / len(window)


def first(rows, key):
    return [r[key] for r in rows if key in r][0]


@pytest.fixture(scope="module")
def ppo(tinyhh_ppo):
    """The session's stage=ppo run with PPO_SHORT (tests/conftest.py: trained once, shared with tests/science)."""
    return tinyhh_ppo


@pytest.fixture(scope="module")
def ppo_ptx(tinyhh_rm, tinyhh_root, data_cache):
    # 4 pretraining blocks per micro-batch (default 8), as make demo runs it: the same direction, less compute.
    # PPO_MIDPOINT iterations: compared with the session's PPO run where it is evaluated mid-run (constant learning
    # rate and fixed KL coefficient, so its first PPO_MIDPOINT iterations are a run of that length).
    # No oracle judging after training (sample_eval=0): the test reads the training and held-out metrics only.
    run_stage(
        tinyhh_root,
        data_cache,
        "stage=ppo_ptx",
        *SHORT,
        f"stage.iterations={PPO_MIDPOINT}",
        "stage.ptx_micro_batch_size=4",
        "stage.sample_eval=0",
        timeout=1500,
    )
    return tinyhh_root / "runs" / "tinyhh" / "ppo_ptx"


def test_ppo_raises_reward_and_harmlessness_with_bounded_kl(ppo):
    rows = read_metrics(ppo)
    print(
        {
            k: last(rows, k)
            for k in (
                "eval/score",
                "eval/kl",
                "eval/harmlessness",
                "start/harmlessness",
                "eval/helpfulness",
                "start/helpfulness",
            )
        }
    )
    assert first(rows, "eval/kl") == 0.0  # step 0: policy == reference, dropout off, same temperature
    # RM score (normalised units): the mean over 10 iterations (640 episodes) rises clearly; held-out, it rises
    assert trained_score(rows, "last") > trained_score(rows, "first") + 0.25
    assert last(rows, "eval/score") > first(rows, "eval/score")
    assert 0 < last(rows, "eval/kl") < 10.0
    assert last(rows, "eval/harmlessness") > last(rows, "start/harmlessness")  # the same 100 held-out prompts
    assert last(rows, "eval/helpfulness") >= last(rows, "start/helpfulness") - 0.10
    stage = OmegaConf.load(ppo / "config.yaml").stage  # the run's own settings, not a copy of PPO_SHORT
    per_iteration = [r for r in rows if "ppo/score" in r]
    assert [r["step"] for r in per_iteration] == list(range(1, stage.iterations + 1))
    held_out = [r["step"] for r in rows if "eval/score" in r]
    assert held_out == [0, stage.eval_every, stage.iterations] == [0, PPO_MIDPOINT, 50]  # start, mid-run, end
    for key in (
        "ppo/kl",
        "ppo/kl_coef",
        "ppo/entropy",
        "ppo/approxkl",
        "ppo/clipfrac",
        "ppo/value_clipfrac",
        "ppo/explained_variance",
        "ppo/response_length",
        "ppo/eos_fraction",
        "time/generate_s",
        "time/score_s",
        "time/train_s",
        "perf/samples_per_s",
        "perf/tokens_per_s",
    ):
        assert key in per_iteration[-1], key
    names = {p.name for p in ppo.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "model", "checkpoints", "samples.jsonl"} <= names
    last_ckpt = ppo / "checkpoints" / f"checkpoint-{stage.iterations}"  # the last iteration, both engines
    assert (last_ckpt / "actor").is_dir() and (last_ckpt / "critic").is_dir()
    assert (last_ckpt / "manifest.json").exists()
    samples = [json.loads(line) for line in (ppo / "samples.jsonl").open()]
    train_tables = [s for s in samples if s["table"] == "train"]
    # the first iteration's table, then one every samples_every iterations up to the last
    every = stage.samples_every
    assert {s["iteration"] for s in train_tables} == {1, *range(every, stage.iterations + 1, every)}
    assert all({"prompt", "response", "score", "kl"} <= set(s) for s in train_tables)
    assert any(s["table"] == "eval" for s in samples)


def test_ppo_ptx_keeps_pretraining_loss_lower_at_similar_reward(ppo, ppo_ptx):
    # equal iterations: PPO-ptx's run against the session's PPO run up to its mid-run evaluation
    a = [r for r in read_metrics(ppo) if r["step"] <= PPO_MIDPOINT]
    b = read_metrics(ppo_ptx)
    assert (
        [r["step"] for r in b if "eval/ptx_loss" in r]
        == [0, PPO_MIDPOINT]
        == [r["step"] for r in a if "eval/ptx_loss" in r]
    )
    print(
        {
            "ppo ptx_loss": last(a, "eval/ptx_loss"),
            "ppo_ptx ptx_loss": last(b, "eval/ptx_loss"),
            "ppo score": last(a, "eval/score"),
            "ppo_ptx score": last(b, "eval/score"),
        }
    )
    assert first(a, "eval/ptx_loss") == first(b, "eval/ptx_loss")  # the same SFT start and held-out blocks
    assert last(b, "eval/ptx_loss") < last(a, "eval/ptx_loss")
    assert "ppo/ptx_loss" in [r for r in b if "ppo/score" in r][-1]
    assert (
        trained_score(b, "last") > trained_score(b, "first") + 0.15
    )  # PPO-ptx still optimises the reward ...
    assert trained_score(b, "last") > trained_score(a, "last") - 0.3  # ... to a similar level
    assert last(b, "eval/score") > first(b, "eval/score")  # held-out prompts too


def test_a_mid_run_evaluation_changes_no_update(tinyhh_rm, tinyhh_root, data_cache):
    # what lets test_ppo_ptx_... compare at the session's PPO run's mid-run evaluation
    tiny = ["stage=ppo", "stage.iterations=2", "stage.rollout_batch_size=32", "stage.eval_prompts=16"]
    runs = {}
    for every in (0, 1):
        name = f"ppo_eval_every_{every}"
        run_stage(
            tinyhh_root,
            data_cache,
            *tiny,
            f"stage.eval_every={every}",
            f"stage.name={name}",
            "stage.sample_eval=0",
        )
        runs[every] = read_metrics(tinyhh_root / "runs" / "tinyhh" / name)

    def updates(rows):
        return [{k: v for k, v in r.items() if k.startswith("ppo/")} for r in rows if "ppo/score" in r]

    def held_out(rows):
        return {r["step"]: r["eval/score"] for r in rows if "eval/score" in r}

    assert len(updates(runs[0])) == 2 and updates(runs[0]) == updates(runs[1])
    assert sorted(held_out(runs[1])) == [0, 1, 2] and sorted(held_out(runs[0])) == [0, 2]
    assert held_out(runs[0])[2] == held_out(runs[1])[2]  # the end, too, as if never evaluated in between


def test_ppo_with_lora_uses_the_policy_without_adapters_as_reference(tinyhh_rm, tinyhh_root, data_cache):
    run_stage(
        tinyhh_root,
        data_cache,
        "stage=ppo",
        "stage.name=ppo_lora",
        "model.lora.enabled=true",
        "stage.iterations=3",
        "stage.rollout_batch_size=32",
        "stage.lr=1e-3",
        "stage.sample_eval=0",
    )
    out = tinyhh_root / "runs" / "tinyhh" / "ppo_lora"
    rows = read_metrics(out)
    assert first(rows, "eval/kl") == 0.0  # adapters start as a no-op: policy == reference exactly
    assert last(rows, "eval/kl") != 0.0  # ... and then move the policy away from it
    # the SFT model with the PPO adapter merged (not the base + adapter), the adapter alone in adapter/
    assert (out / "model" / "model.safetensors").exists()
    assert not (out / "model" / "adapter_config.json").exists()
    adapter = (out / "model" / "adapter" / "adapter_config.json").read_text()
    assert str((tinyhh_root / "runs" / "tinyhh" / "sft" / "model").resolve()) in adapter
    assert models.load_causal_lm(str(out / "model")).config.num_hidden_layers > 0


def test_bad_batch_arithmetic_and_missing_inputs_fail_fast(tinyhh_rm, tinyhh_root, data_cache):
    proc = run_stage(
        tinyhh_root, data_cache, "stage=ppo", "stage.name=ppo_bad", "stage.rollout_batch_size=48", check=False
    )
    assert (
        proc.returncode != 0
        and "stage.rollout_batch_size=48" in proc.stderr
        and "minibatch_size" in proc.stderr
    )
    proc = run_stage(
        tinyhh_root,
        data_cache,
        "stage=ppo",
        "stage.name=ppo_bad",
        "stage.init_from=/nonexistent/sft/model",
        check=False,
    )
    assert proc.returncode != 0 and "stage=sft" in proc.stderr


def test_nan_stops_the_run_with_a_checkpoint(tinyhh_rm, tinyhh_root, data_cache):
    proc = run_stage(
        tinyhh_root,
        data_cache,
        "stage=ppo",
        "stage.name=ppo_nan",
        "stage.lr=1e30",
        "stage.iterations=3",
        "stage.rollout_batch_size=32",
        "stage.sample_eval=0",
        check=False,
    )
    assert proc.returncode != 0 and "NaN/inf" in proc.stderr, proc.stderr[-2000:]
    nonfinite = tinyhh_root / "runs" / "tinyhh" / "ppo_nan" / "checkpoints" / "nonfinite"
    saved = list(nonfinite.glob("checkpoint-*/actor"))
    assert saved and str(saved[0].parent) in proc.stderr  # the error names where the weights are


def test_ppo_with_llama2_two_reward_models(tinyhh_rm, tinyhh_root, data_cache):
    rm = str(tinyhh_rm[0] / "model")  # the same RM in both roles: exercises the combination, not its quality
    run_stage(
        tinyhh_root,
        data_cache,
        "stage=ppo",
        "stage.name=ppo_llama2",
        "reward=llama2",
        f"reward.helpful_model={rm}",
        f"reward.safety_model={rm}",
        "stage.iterations=2",
        "stage.rollout_batch_size=32",
        "stage.sample_eval=0",
    )
    rows = [r for r in read_metrics(tinyhh_root / "runs" / "tinyhh" / "ppo_llama2") if "ppo/score" in r]
    assert len(rows) == 2
    # whitened per batch (Llama 2): the logit-scale scores have mean ~0 before the EOS penalty and clip
    assert abs(rows[0]["ppo/rm_score"]) < 1e-4
