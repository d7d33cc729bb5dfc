"""LoRA through the whole chain on a GPT-2 stand-in (Conv1D, c_attn: PEFT's default targets, not Llama's):
sft -> rm -> ppo -> rejection sampling, each stage's model/ reloading to the policy that finished training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignlab import models
from tests.conftest import alignlab
from tests.zoo.families import _WORDS, build

IDS = torch.tensor([[5, 17, 42, 9, 33, 7, 2, 11], [8, 3, 19, 27, 4, 55, 61, 12]])
COMMON = ("model=tinyhh", "model.lora.enabled=true", "data=local", "logger.progress=false")


def write_data(root: Path) -> tuple[Path, Path]:
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    sft, pref = root / "sft.jsonl", root / "pref.jsonl"
    with open(sft, "w") as f_sft, open(pref, "w") as f_pref:
        for _ in range(48):
            prompt = f"\n\nHuman: {words(5).capitalize()}?\n\nAssistant:"
            f_sft.write(json.dumps({"prompt": prompt, "completion": f" {words(6)}."}) + "\n")
            row = {"prompt": prompt, "chosen": f" Sure, {words(5)}.", "rejected": f" No. {words(3)}"}
            f_pref.write(json.dumps(row) + "\n")
    return sft, pref


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.float()


def with_adapter(base, adapter_dir: Path):
    from peft import PeftModel

    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    return PeftModel.from_pretrained(base, adapter_dir)


def adapter_base(model_dir: Path) -> str:
    return json.loads((model_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_lora_sft_rm_ppo_rs_chain_keeps_every_stage(tmp_path):
    base = build("gpt2", tmp_path / "zoo")
    sft_data, pref_data = write_data(tmp_path)
    model = (f"model.name_or_path={base}",)

    alignlab(
        "stage=sft", *COMMON, *model, f"stage.init_from={base}", f"data.source={sft_data}",
        "data.format=prompt_completion", f"run_dir={tmp_path / 'sft'}", "stage.sample_eval=0", "stage.steps=2",
        "stage.batch_size=4", "stage.micro_batch_size=4", "stage.eval_rows=4", "stage.lr=1e-2", cwd=tmp_path,
    )  # fmt: skip
    sft = tmp_path / "sft" / "model"
    assert adapter_base(sft) == str(base.resolve())
    sft_logits = logits(AutoModelForCausalLM.from_pretrained(sft))
    assert (sft_logits - logits(AutoModelForCausalLM.from_pretrained(base))).abs().max() > 1e-3
    torch.testing.assert_close(
        logits(with_adapter(AutoModelForCausalLM.from_pretrained(base), sft / "adapter")),
        sft_logits,
        atol=1e-5,
        rtol=0,
    )

    alignlab(
        "stage=rm", *COMMON, *model, f"stage.init_from={sft}", f"data.source={pref_data}", "data.format=preference",
        f"run_dir={tmp_path / 'rm'}", "stage.margin=none", "stage.steps=2", "stage.batch_size=4",
        "stage.micro_batch_size=4", "stage.eval_rows=8", "stage.normalize_samples=4", "stage.normalize_max_new_tokens=8",
        "stage.lr=1e-2", cwd=tmp_path,
    )  # fmt: skip
    rm = tmp_path / "rm" / "model"
    assert adapter_base(rm) == str(sft.resolve())
    metrics = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert (
        any("rm/accuracy" in m for m in metrics) and (rm / "reward_normalization.json").exists()
    )  # step 6 ran
    scores = logits(models.load_reward_model(str(rm)))
    seq_cls = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    seq_cls.config.pad_token_id = models.load_tokenizer(str(sft)).pad_token_id
    torch.testing.assert_close(logits(with_adapter(seq_cls, rm / "adapter")), scores, atol=1e-5, rtol=0)

    alignlab(
        "stage=ppo", *COMMON, *model, f"stage.init_from={sft}", f"stage.value_from={rm}",
        f"reward.reward_model={rm}", f"data.source={sft_data}", "data.format=prompt_completion",
        f"run_dir={tmp_path / 'ppo'}", "stage.iterations=2", "stage.rollout_batch_size=4", "stage.minibatch_size=4",
        "stage.micro_batch_size=4", "stage.eval_prompts=4", "stage.max_new_tokens=6", "stage.eval_max_new_tokens=6",
        "stage.sample_eval=0", "stage.lr=1e-2", cwd=tmp_path,
    )  # fmt: skip
    ppo = tmp_path / "ppo" / "model"
    assert adapter_base(ppo) == str(sft.resolve())
    reloaded = logits(models.load_causal_lm(str(ppo)))
    trained = logits(
        with_adapter(AutoModelForCausalLM.from_pretrained(sft), ppo / "adapter")
    )  # SFT + PPO's LoRA
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(ppo)), trained, atol=1e-5, rtol=0)
    without_sft = logits(with_adapter(AutoModelForCausalLM.from_pretrained(base), ppo / "adapter"))
    assert (reloaded - without_sft).abs().max() > 1e-3  # the bug: base + PPO adapter, the SFT lost
    assert (reloaded - sft_logits).abs().max() > 1e-4  # PPO moved the policy

    alignlab(
        "stage=rejection_sampling", *COMMON, *model, f"stage.init_from={ppo}", f"reward.reward_model={rm}",
        f"data.source={sft_data}", "data.format=prompt_completion", f"run_dir={tmp_path / 'rs'}",
        "stage.iterations=1", "stage.prompts_per_iteration=8", "stage.samples_per_prompt=2",
        "stage.max_new_tokens=6", "stage.generation_batch_size=16", "stage.eval_prompts=4", "stage.sample_eval=0",
        "stage.truncated=keep", "stage.finetune.steps=2", "stage.finetune.batch_size=4",
        "stage.finetune.micro_batch_size=4", "stage.finetune.eval_rows=2", "stage.finetune.lr=1e-2", cwd=tmp_path,
    )  # fmt: skip
    rs = tmp_path / "rs" / "model"
    assert adapter_base(rs) == str(ppo.resolve())
    rs_logits = logits(models.load_causal_lm(str(rs)))
    torch.testing.assert_close(
        logits(with_adapter(AutoModelForCausalLM.from_pretrained(ppo), rs / "adapter")),
        rs_logits,
        atol=1e-5,
        rtol=0,
    )
    assert (
        rs_logits - logits(with_adapter(AutoModelForCausalLM.from_pretrained(base), rs / "adapter"))
    ).abs().max() > 1e-3
