"""stage=dpo end to end on TinyHH from the session's SFT model: the implicit reward learns the held-out
preferences, the run directory holds what the next stage needs; LoRA (here with the IPO loss) trains against the
policy with its adapters disabled."""

from __future__ import annotations

import pytest

from alignlab import models
from alignlab.tracking import read_metrics
from tests.conftest import run_stage

pytestmark = pytest.mark.slow

# LoRA: 20 steps of 32 pairs (of ~3,600), 64 held-out pairs, no oracle judging: seconds, the same code paths.
SHORT = ["stage=dpo", "stage.steps=20", "stage.eval_rows=64", "stage.sample_eval=0"]


def evals(rows, key):
    return [r[key] for r in rows if key in r]


def test_dpo_learns_the_held_out_preferences(tinyhh_dpo):
    # the session's DPO run with its defaults (tests/conftest.py; tests/science judges its answers)
    out = tinyhh_dpo
    rows = read_metrics(out)
    accuracy, margin = evals(rows, "eval/reward_accuracy"), evals(rows, "eval/reward_margin")
    # session's chain: 0.86 after one epoch (beta 0.5, lr 2e-5)
    print({"accuracy": accuracy, "margin": margin})
    steps = [r["step"] for r in rows if "eval/reward_accuracy" in r]
    assert steps[0] == 0 and len(steps) == 2  # before and after training
    assert margin[0] == 0.0  # step 0: the policy is its reference
    assert accuracy[-1] > 0.7 and margin[-1] > 0  # the implicit reward ranks held-out pairs
    assert {"config.yaml", "metrics.jsonl", "model", "checkpoints", "done.json"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "checkpoints" / f"checkpoint-{steps[-1]}" / "manifest.json").exists()
    assert models.load_causal_lm(str(out / "model")).config.num_hidden_layers > 0


def test_dpo_with_lora_trains_against_the_adapters_disabled(tinyhh_sft, tinyhh_root, data_cache):
    run_stage(
        tinyhh_root,
        data_cache,
        *SHORT,
        "stage.loss=ipo",
        "model.lora.enabled=true",
        "stage.lr=1e-3",
        "stage.name=dpo_lora",
    )
    out = tinyhh_root / "runs" / "tinyhh" / "dpo_lora"
    rows = read_metrics(out)
    accuracy, margin = evals(rows, "eval/reward_accuracy"), evals(rows, "eval/reward_margin")
    print({"accuracy": accuracy, "margin": margin})  # session's chain: 0.67, 0.09
    assert margin[0] == 0.0  # adapters start as a no-op: the policy is the SFT model, its reference
    assert margin[-1] > 0 and accuracy[-1] > 0.55  # ... and then move it
    # the SFT model with the DPO adapter merged, the adapter alone in adapter/ (on the SFT model)
    assert (out / "model" / "model.safetensors").exists()
    adapter = (out / "model" / "adapter" / "adapter_config.json").read_text()
    assert str((tinyhh_root / "runs" / "tinyhh" / "sft" / "model").resolve()) in adapter
