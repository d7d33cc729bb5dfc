"""Every stage on random-init stand-ins of real model families, on local files in the formats people have.

Each family runs sft -> rm -> dpo -> ppo (2 iterations, with and without LoRA) -> grpo -> rejection_sampling -> rain
(2 prompts) -> eval (judge=rm, with the reward-guided decodings) as a user would (`python -m alignlab ...`, data=local), on its own data formats, so that
together they cover HH transcripts (with CRLF rows), TRL prompt/completion and preference files in plain and conversational
form (explicit and implicit prompt), and chat messages with a system turn. The assertions are on what a user would
check: the runs finish, models reload, answers are rendered and scored in the model's own format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import alignlab
from tests.zoo.data import FILES, write_all
from tests.zoo.families import build

pytestmark = pytest.mark.slow

# family -> (sft data, rm data, prompt data for ppo / rejection sampling): every format at least once
PLAN = {
    "gpt_neox": ("hh", "hh", "hh"),
    "llama": ("pc", "pref", "pref"),
    "qwen2": ("messages", "pref_conv", "pc_conv"),
    "gpt2": ("pc_conv", "pref_implicit", "pref_implicit"),
}
# scripts/gpu_smoke.sh runs this tier in bfloat16 on a GPU (ZOO_DTYPE=bfloat16); float32 on the CPU by default
QUIET = ["logger.progress=false", f"model.dtype={os.environ.get('ZOO_DTYPE', 'float32')}"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo_chain")
    write_all(root / "data")
    return root


def data(root: Path, name: str) -> list[str]:
    file, fmt = FILES[name]
    return ["data=local", f"data.source={root / 'data' / file}", f"data.format={fmt}"]


def run(root: Path, family: str, stage: str, *overrides: str, name: str | None = None) -> Path:
    run_dir = root / "runs" / family / (name or stage)
    alignlab(
        f"stage={stage}", f"run_dir={run_dir}", f"paths.runs={root / 'runs'}", *QUIET, *overrides, cwd=root
    )
    assert (run_dir / "done.json").exists()
    return run_dir


def metrics(run_dir: Path) -> dict:
    out: dict = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        out.update(json.loads(line))
    return out


@pytest.mark.parametrize("family", list(PLAN))
def test_every_stage_on_the_family(world, family):
    base = build(family, world / "zoo")
    sft_data, rm_data, prompt_data = PLAN[family]
    model = [f"model.name_or_path={base}"]

    # SFT on the family's demonstrations
    sft = run(
        world,
        family,
        "sft",
        *model,
        *data(world, sft_data),
        "stage.sample_eval=0",
        "stage.steps=4",
        "stage.batch_size=8",
        "stage.micro_batch_size=8",
        "stage.eval_rows=8",
        "stage.lr=1e-3",
    )
    sft_model = sft / "model"
    tok = AutoTokenizer.from_pretrained(sft_model)
    if family == "qwen2":  # the chat template was used, and its end-of-turn token is the EOS
        assert tok.init_kwargs["alignlab_chat_format"] == "template" and tok.eos_token == "<|im_end|>"
    else:
        assert tok.init_kwargs["alignlab_chat_format"] == "hh"
    assert metrics(sft)["eval/answer_loss"] < metrics(sft)["eval/answer_loss_start"]

    # Reward model with the default margin setting on preference data that has no rating column
    rm = run(
        world,
        family,
        "rm",
        f"stage.init_from={sft_model}",
        *model,
        *data(world, rm_data),
        "stage.steps=4",
        "stage.batch_size=8",
        "stage.micro_batch_size=8",
        "stage.eval_rows=8",
        "stage.normalize_samples=8",
        "stage.normalize_max_new_tokens=8",
        "stage.lr=1e-3",
    )
    rm_model = rm / "model"
    assert 0.0 <= metrics(rm)["rm/accuracy"] <= 1.0 and (rm_model / "reward_normalization.json").exists()

    # DPO on the same preference data, from the SFT model: the pairs in the model's own format, its EOS ending
    # each answer (pad == eos on gpt2), and a policy that reloads without alignlab
    dpo = run(
        world,
        family,
        "dpo",
        f"stage.init_from={sft_model}",
        *model,
        *data(world, rm_data),
        "stage.steps=2",
        "stage.batch_size=8",
        "stage.micro_batch_size=8",
        "stage.eval_rows=8",
        "stage.lr=1e-3",
    )
    assert metrics(dpo)["eval/reward_margin"] != 0.0 and metrics(dpo)["data/train_pairs"] > 0
    assert isinstance(AutoModelForCausalLM.from_pretrained(dpo / "model"), torch.nn.Module)

    rl = [
        f"stage.init_from={sft_model}",
        f"reward.reward_model={rm_model}",
        *model,
        *data(world, prompt_data),
    ]
    ppo_sizes = [
        f"stage.value_from={rm_model}",
        "stage.iterations=2",
        "stage.rollout_batch_size=8",
        "stage.minibatch_size=4",
        "stage.micro_batch_size=4",
        "stage.eval_prompts=4",
        "stage.max_new_tokens=12",
        "stage.sample_eval=0",
        "stage.samples_every=1",
    ]
    ppo = run(world, family, "ppo", *rl, *ppo_sizes)
    lora = run(world, family, "ppo", *rl, *ppo_sizes, "model.lora.enabled=true", name="ppo_lora")
    for run_dir in (ppo, lora):
        reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # plain transformers, no PEFT
        assert isinstance(reloaded, torch.nn.Module) and metrics(run_dir)["ppo/kl_coef"] > 0
    # critic-free: 2 prompts x K = 4 answers each, no critic loaded or saved
    grpo = run(world, family, "grpo", *rl, *ppo_sizes)
    assert not (grpo / "checkpoints" / "checkpoint-2" / "critic").exists()
    assert metrics(grpo)["ppo/kl_loss"] >= 0 and (grpo / "model" / "config.json").exists()
    samples = [json.loads(x) for x in (ppo / "samples.jsonl").read_text().splitlines()]
    assert samples and all(
        s["prompt"].endswith("\n\nAssistant:") for s in samples
    )  # HH text, rendered per model
    assert not any("<|im_end|>" in s["response"] or "</s>" in s["response"] for s in samples)

    rs = run(
        world,
        family,
        "rejection_sampling",
        *rl,
        "stage.iterations=1",
        "stage.prompts_per_iteration=8",
        "stage.samples_per_prompt=2",
        "stage.generation_batch_size=16",
        "stage.eval_prompts=4",
        "stage.max_new_tokens=12",
        "stage.sample_eval=0",
        "stage.finetune.steps=2",
        "stage.finetune.batch_size=4",
        "stage.finetune.micro_batch_size=4",
        "stage.finetune.eval_rows=2",
        # a random-init model rarely ends an answer within 12 tokens; the default (drop) would keep nothing
        "stage.truncated=keep",
    )
    assert (rs / "model" / "config.json").exists()

    prompts = world / "data" / "prompts.jsonl"
    rain = run(
        world,
        family,
        "rain",
        f"stage.init_from={sft_model}",
        *model,
        *data(world, prompt_data),
        f"stage.prompts={prompts}",
        "stage.n_prompts=2",
        "stage.max_new_tokens=6",
        "stage.T=4",
        "stage.T_m=2",
        "stage.batch_prompts=2",
    )
    rain_rows = [json.loads(x) for x in (rain / "samples.jsonl").read_text().splitlines()]
    assert len(rain_rows) == 2 and all(isinstance(r["rain"], str) for r in rain_rows)

    systems = (
        f"stage.systems={{sft: {{model: '{sft_model}'}}, ppo: {{model: '{ppo / 'model'}'}}, "
        f"rain: {{answers: '{rain / 'samples.jsonl'}', answers_field: rain}}, "
        # reward-guided decoding with the family's RM: its KV cache (ARGS) and whole prefixes (blockwise)
        f"sft_args: {{model: '{sft_model}', decoding: args, top_k: 3}}, "
        f"sft_blockwise: {{model: '{sft_model}', decoding: blockwise, n: 2, block_size: 3}}}}"
    )
    ev = run(
        world,
        family,
        "eval",
        *model,
        *data(world, prompt_data),
        systems,
        "stage.judge=rm",
        f"reward.reward_model={rm_model}",
        f"stage.prompts={prompts}",
        "stage.n_prompts=2",
        "stage.max_new_tokens=6",
        f"stage.reference={sft_model}",
        "stage.curves=[]",
    )
    results = json.loads((ev / "results.json").read_text())
    assert {"sft", "ppo", "rain", "sft_args", "sft_blockwise"} <= set(results["systems"])
    assert results["systems"]["sft_args"]["reward_calls_per_answer"] > 0
