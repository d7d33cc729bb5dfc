"""LoRA: a saved stage reloads to exactly the trained policy (merged model/ and PEFT's model/adapter), target
modules default per architecture, and a mistyped model path says what it is."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignlab import models
from alignlab.checkpoint import save_pretrained
from alignlab.config import register_configs
from tests.conftest import ROOT
from tests.zoo.families import build

IDS = torch.tensor([[5, 17, 42, 9, 33, 7, 2, 11], [8, 3, 19, 27, 4, 55, 61, 12]])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def trained(model, seed: int = 1):
    """Pretend training happened: every trainable tensor (LoRA A and B, a SEQ_CLS score head) moved."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.float()


def adapted(peft_model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize(
    "family, expected",
    [
        ("gpt2", {"c_attn"}),
        ("gpt_neox", {"query_key_value"}),
        ("llama", {"q_proj", "v_proj"}),
        ("qwen2", {"q_proj", "v_proj"}),
    ],
)
def test_default_targets_are_the_architectures(zoo, family, expected):
    model = models.load_causal_lm(str(build(family, zoo)))
    assert adapted(models.apply_lora(model, r=2, alpha=4, dropout=0.0)) == expected


def test_all_linear_composes_from_the_command_line_and_adapts_the_mlp(zoo):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=sft", "model.lora.target_modules=all-linear"])
        as_list = compose(config_name="config", overrides=["stage=sft", "model.lora.target_modules=[q_proj]"])
    assert cfg.model.lora.target_modules == "all-linear"
    assert list(as_list.model.lora.target_modules) == ["q_proj"]
    model = models.load_causal_lm(str(build("llama", zoo)))
    lo = cfg.model.lora
    names = adapted(models.apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=lo.target_modules))
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert "lm_head" not in names


def test_targets_that_match_nothing_are_one_clear_error(zoo):
    model = models.load_causal_lm(str(build("gpt2", zoo)))
    with pytest.raises(ValueError) as e:
        models.apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    msg = str(e.value)
    assert "model.lora.target_modules" in msg and "q_proj" in msg and "c_attn" in msg


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])  # Conv1D (fan_in_fan_out) / tied embeddings
def test_saved_causal_lm_reloads_to_the_trained_policy(zoo, tmp_path, family):
    base_dir = build(family, zoo)
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = models.load_causal_lm(str(base_dir))
    base_logits = logits(base)
    policy = trained(models.apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    expected = logits(policy)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter is not a no-op

    out = save_pretrained(policy, tok, tmp_path / "model", state_dict=policy.state_dict())

    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    torch.testing.assert_close(logits(models.load_causal_lm(str(out))), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), expected, atol=1e-5, rtol=0)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    from peft import PeftModel

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    torch.testing.assert_close(logits(peft), expected, atol=1e-5, rtol=0)
    assert logits(policy).equal(expected)  # saving left the live (training) model untouched


def test_saved_lora_reward_model_keeps_its_trained_score_head(zoo, tmp_path):
    base_dir = build("gpt_neox", zoo)  # no pad token: the reward model reads pad_token_id from the tokenizer
    tok = models.load_tokenizer(str(base_dir))
    rm = models.load_reward_model(str(base_dir), pad_token_id=tok.pad_token_id)
    rm = trained(models.apply_lora(rm, r=4, alpha=8, dropout=0.0, task_type="SEQ_CLS"))
    expected = logits(rm)

    out = save_pretrained(rm, tok, tmp_path / "model", state_dict=rm.state_dict())

    reloaded = models.load_reward_model(str(out)).eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    assert reloaded.config.pad_token_id == tok.pad_token_id
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    peft = PeftModel.from_pretrained(base, out / "adapter").eval()
    torch.testing.assert_close(logits(peft), expected, atol=1e-5, rtol=0)


def test_bfloat16_policy_is_saved_in_bfloat16(zoo, tmp_path):
    base_dir = build("llama", zoo)
    policy = models.load_causal_lm(str(base_dir), dtype="bfloat16")
    policy = trained(models.apply_lora(policy, r=4, alpha=8, dropout=0.0))
    out = save_pretrained(
        policy, AutoTokenizer.from_pretrained(base_dir), tmp_path / "m", policy.state_dict()
    )
    reloaded = models.load_causal_lm(str(out), dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    torch.testing.assert_close(logits(reloaded), logits(policy), atol=0.05, rtol=0)  # bf16 rounding of W + BA


def test_adapter_only_directories_saved_before_still_load(zoo, tmp_path):
    base_dir = build("llama", zoo)
    policy = trained(models.apply_lora(models.load_causal_lm(str(base_dir)), r=4, alpha=8, dropout=0.0))
    policy.save_pretrained(tmp_path / "old_sft")  # the old layout: adapter files only
    torch.testing.assert_close(
        logits(models.load_causal_lm(str(tmp_path / "old_sft"))), logits(policy), atol=1e-5, rtol=0
    )

    tok = models.load_tokenizer(str(base_dir))
    rm = models.load_reward_model(str(base_dir), pad_token_id=tok.pad_token_id)
    rm = trained(models.apply_lora(rm, r=4, alpha=8, dropout=0.0, task_type="SEQ_CLS"))
    rm.save_pretrained(tmp_path / "old_rm")
    reloaded = models.load_reward_model(str(tmp_path / "old_rm"), pad_token_id=tok.pad_token_id)
    torch.testing.assert_close(logits(reloaded.eval()), logits(rm), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["my-modle", "runs/sfT"])
def test_a_mistyped_path_is_not_sent_to_an_offline_hub(monkeypatch, tmp_path, name):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as e:
        models.require_input(name, "stage.init_from")
    msg = str(e.value)
    assert f"stage.init_from={name}" in msg and str(tmp_path / name) in msg and "not reachable" in msg
    with pytest.raises(FileNotFoundError, match="model.name_or_path"):
        models.load_causal_lm(name)


def test_a_hub_name_that_does_not_exist_is_named(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def load(name, **_):  # what transformers raises for a repo the hub does not have
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on the hub")

    with pytest.raises(FileNotFoundError) as e:
        models.from_dir_or_hub(load, "my-modle", "model.name_or_path")
    assert "model.name_or_path=my-modle" in str(e.value) and "no such hub repo" in str(e.value)
    assert str(tmp_path / "my-modle") in str(e.value)
