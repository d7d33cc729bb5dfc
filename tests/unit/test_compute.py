"""Training compute (alignlab/compute.py): the FLOP formulas by hand, the ledger, and the chain of compute.json
records behind a model."""

import json

import pytest

from alignlab import compute, models


def test_flop_formulas_by_hand():
    # forward: 2 FLOPs per parameter per token
    assert compute.forward_flops(1_000, 50) == 100_000
    # full fine-tuning: 6 N per token (Kaplan's C = 6ND)
    assert compute.train_flops(1_000, 1_000, 50) == 300_000
    # LoRA: 4 N (forward + activation gradients) + 2 x the adapters' parameters
    assert compute.train_flops(1_000, 10, 50) == (4 * 1_000 + 2 * 10) * 50
    # frozen model trained through (nothing trainable): forward and activation gradients only
    assert compute.train_flops(1_000, 0, 1) == 4_000


def test_ledger_adds_merges_and_round_trips():
    a = compute.Ledger()
    a.forward("rollout", 100, 10)
    a.train("actor", 100, 100, 10)
    a.forward("rollout", 100, 5)
    assert a.flops == {"rollout": 3_000.0, "actor": 6_000.0}
    assert a.tokens == {"rollout": 15.0, "actor": 10.0}
    b = compute.Ledger.from_dict(a.as_dict())
    b.merge(a)
    assert b.total == 2 * a.total == 18_000.0
    assert b.tokens["rollout"] == 30.0
    assert compute.Ledger.from_dict(None).total == 0.0  # an older checkpoint without a count


def record(run_dir, recipe, flops, inputs):
    ledger = compute.Ledger()
    ledger.add("train", flops, 1)
    (run_dir / "model").mkdir(parents=True)
    compute.write(run_dir, recipe, ledger, inputs)
    return str(run_dir / "model")


def test_chain_charges_every_stage_behind_the_models_once(tmp_path):
    base = record(tmp_path / "pretrain", "pretrain", 1e12, [])
    sft = record(tmp_path / "sft", "sft", 1e9, [base])
    rm = record(tmp_path / "rm", "rm", 2e9, [sft])
    ppo = record(tmp_path / "ppo", "ppo", 5e10, [sft, rm, None])
    # PPO's chain: pretrain, sft (shared by ppo and rm: once), rm, ppo
    c = compute.chain([ppo])
    assert c.training_flops == 1e9 + 2e9 + 5e10
    assert c.pretraining_flops == 1e12
    assert c.unknown == []
    # best-of-N on the SFT model with the RM: the SFT and the RM stages
    assert compute.chain([sft, rm]).training_flops == 1e9 + 2e9
    # a model with no record (a hub model) is listed, not charged
    c = compute.chain(["org/hub-model", sft])
    assert c.unknown == ["org/hub-model"] and c.training_flops == 1e9
    # the record is found from the model dir, the run dir, or an iteration's model (<run>/iteration_1/model)
    (tmp_path / "sft" / "iteration_1" / "model").mkdir(parents=True)
    assert compute.record_of(tmp_path / "sft" / "iteration_1" / "model") == tmp_path / "sft" / "compute.json"
    record_file = json.loads((tmp_path / "ppo" / "compute.json").read_text())
    assert record_file["recipe"] == "ppo" and record_file["inputs"] == sorted([sft, rm])


def test_chain_survives_a_stage_that_lists_itself(tmp_path):
    # rejection sampling with train_from=previous starts an iteration from its own earlier model
    run = tmp_path / "rs"
    (run / "iteration_1" / "model").mkdir(parents=True)
    out = record(run, "rejection_sampling", 3.0, [str(run / "iteration_1" / "model")])
    assert compute.chain([out]).training_flops == 3.0


def test_a_broken_record_names_its_file(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "compute.json").write_text("{not json")
    with pytest.raises(ValueError, match="compute.json"):
        compute.chain([str(tmp_path / "model")])


def test_parameter_count_from_the_config_alone(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    assert models.parameter_count(str(tmp_path)) == models.count_parameters(model)
    # a reward model: the same backbone, a one-output score head instead of the LM head
    reward = models.parameter_count(str(tmp_path), reward=True)
    assert reward == models.count_parameters(model) - 64 * 16 + 16
    # trainable only
    model.model.embed_tokens.weight.requires_grad_(False)
    assert models.count_parameters(model, trainable=True) == models.count_parameters(model) - 64 * 16


def test_rejection_sampling_charges_its_pool_and_its_fine_tune():
    from alignlab.recipes.rejection_sampling import iteration_compute

    pool = [{"positions": [10, 12]}, {"positions": [8, 10]}, {"responses": ["an older pool row"]}]
    spent = iteration_compute(pool, 1_000, 300, {"train_flops": 7e6, "train_tokens": 900})
    assert spent.tokens == {"sample": 40.0, "score": 40.0, "finetune": 900.0}
    assert spent.flops == {"sample": 2 * 1_000 * 40, "score": 2 * 300 * 40, "finetune": 7e6}
