"""stage=pretrain end to end on a reduced TinyHH config (seconds), asserting outcomes, not only that it ran."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignlab.tracking import read_metrics
from tests.conftest import alignlab

pytestmark = pytest.mark.slow
# 80 steps (experiment=quick: 150): the held-out loss is ~1.6 nats by then, far below the unigram baseline's 5.5
QUICK = [
    "stage=pretrain",
    "experiment=quick",
    "stage.steps=80",
    "stage.sample_eval=8",
    "stage.eval_max_new_tokens=24",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("pretrain")
    alignlab(*QUICK, f"paths.runs={root / 'runs'}", f"paths.data={data_cache}", cwd=root)
    return root / "runs" / "quick" / "pretrain"


def run_config(run):
    """The run's own resolved settings (config.yaml), so the tests follow experiment=quick instead of copying it."""
    return OmegaConf.load(run / "config.yaml")


def test_run_directory_contract(quick_run):
    names = {p.name for p in quick_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "model", "checkpoints", "samples.jsonl"} <= names
    assert not any(n.startswith(".") for n in names)  # no temp debris from atomic saves
    config = (quick_run / "config.yaml").read_text()
    assert "${" not in config  # fully resolved
    steps = run_config(quick_run).stage.steps
    assert isinstance(steps, int) and steps > 0
    # the end of training is one committed checkpoint, at the last step
    assert [p.name for p in (quick_run / "checkpoints").iterdir()] == [f"checkpoint-{steps}"]
    assert (quick_run / "checkpoints" / f"checkpoint-{steps}" / "manifest.json").exists()


def test_model_reloads_and_beats_unigram(quick_run):
    rows = read_metrics(quick_run)
    baseline = next(r["eval/unigram_loss"] for r in rows if "eval/unigram_loss" in r)
    final = [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
    assert final < 0.5 * baseline, (final, baseline)
    model = AutoModelForCausalLM.from_pretrained(quick_run / "model")
    tok = AutoTokenizer.from_pretrained(quick_run / "model")
    assert tok.pad_token_id != tok.eos_token_id
    x = tok(["\n\nHuman: how do i bake bread?\n\nAssistant: Sure."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss.item()
    assert loss < baseline  # the reloaded weights are the trained ones


def test_metrics_and_samples(quick_run):
    rows = read_metrics(quick_run)
    stage = run_config(quick_run).stage
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(stage.log_every, stage.steps + 1, stage.log_every))
    assert all(r["perf/tokens_per_s"] > 0 for r in rows if "perf/tokens_per_s" in r)
    final = rows[-1]
    samples = [json.loads(line) for line in (quick_run / "samples.jsonl").open()]
    by_set = {name: [s for s in samples if s["set"] == name] for name in ("benign", "harmful", "attack")}
    assert len(samples) == 3 * stage.sample_eval and all(len(v) == stage.sample_eval for v in by_set.values())
    # each rate is what the oracle said about the samples written next to it, with its 95% interval around it
    expected = {
        "eval/helpfulness": sum(s["helpful"] for s in by_set["benign"]) / stage.sample_eval,
        "eval/harmlessness": sum(not s["harmful"] for s in by_set["harmful"]) / stage.sample_eval,
        "eval/attack_success": sum(s["harmful"] for s in by_set["attack"]) / stage.sample_eval,
    }
    for key, value in expected.items():
        assert final[key] == pytest.approx(value), key
        assert final[f"{key}_ci_low"] <= value <= final[f"{key}_ci_high"], key
        assert final[f"{key}_ci_high"] - final[f"{key}_ci_low"] > 0.2, key  # 8 answers: a wide interval
    # self-evaluation: sample_eval dialogues judged in both option orders, so a multiple of 1 / (2 * sample_eval)
    judged = final["eval/self_eval_accuracy"] * 2 * stage.sample_eval
    assert judged == pytest.approx(round(judged))


def test_missing_input_model_names_the_stage_to_run(tmp_path):
    missing = tmp_path / "runs" / "other" / "pretrain" / "model"
    proc = alignlab(
        "stage=pretrain",
        "stage.from_scratch=false",
        f"model.name_or_path={missing}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert f"model.name_or_path={missing} does not exist" in proc.stderr
    assert "run `python -m alignlab stage=pretrain` first" in proc.stderr


def test_continuing_into_its_own_output_is_refused(tmp_path, quick_run, data_cache):
    proc = alignlab(
        *QUICK,
        "stage.from_scratch=false",
        f"model.name_or_path={quick_run / 'model'}",
        f"run_dir={quick_run}",
        f"paths.data={data_cache}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "is this run's own output" in proc.stderr


def test_missing_data_file_is_named(tmp_path):
    from tests.zoo.families import build

    proc = alignlab(
        "stage=pretrain",
        "data=local",
        f"model.tokenizer={build('gpt2', tmp_path / 'zoo')}",  # own data from scratch needs a tokenizer
        f"data.source={tmp_path}/nope.jsonl",
        f"paths.runs={tmp_path}/runs",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert f"looks like a local path, but {tmp_path}/nope.jsonl does not exist" in proc.stderr


def test_pretrain_on_local_hh_file(tmp_path, quick_run):
    """Any data through `datasets`: an HH transcript file, continuing from the quick model, which learns it."""
    path = tmp_path / "hh.jsonl"
    rows = [
        {"chosen": f"\n\nHuman: how do i bake bread?\n\nAssistant: Sure. Step {i}.", "rejected": "x"}
        for i in range(200)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    alignlab(
        "stage=pretrain",
        "stage.from_scratch=false",
        f"model.name_or_path={quick_run / 'model'}",
        "data=local",
        f"data.source={path}",
        "data.format=hh",
        "stage.steps=4",
        "stage.seq_len=64",
        "stage.eval_batches=1",
        f"paths.runs={tmp_path}/runs",
        cwd=tmp_path,
    )
    trained = tmp_path / "runs" / "tinyhh" / "pretrain" / "model"
    assert (trained / "model.safetensors").exists()
    # a transcript of the file's shape that is not in it: the continued model predicts it much better than the
    # model it started from (measured: about 2.75 -> 1.46 nats per token after the 4 steps)
    tok = AutoTokenizer.from_pretrained(trained)
    x = tok(["\n\nHuman: how do i bake bread?\n\nAssistant: Sure. Step 250."], return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(quick_run / "model")(input_ids=x, labels=x).loss.item()
        after = AutoModelForCausalLM.from_pretrained(trained)(input_ids=x, labels=x).loss.item()
    assert after < 0.8 * before, (before, after)


def test_lora_continued_pretraining_saves_an_adapter_that_loads(tmp_path, quick_run, data_cache):
    from alignlab.models import load_causal_lm

    alignlab(
        *QUICK,
        "stage.from_scratch=false",
        f"model.name_or_path={quick_run / 'model'}",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "stage.steps=6",
        "stage.eval_every=0",
        "stage.sample_eval=0",
        f"paths.runs={tmp_path}/runs",
        f"paths.data={data_cache}",
        cwd=tmp_path,
    )
    model_dir = tmp_path / "runs" / "quick" / "pretrain" / "model"
    # the adapter merged into full weights (what the next stage loads), the adapter alone in adapter/
    assert (model_dir / "model.safetensors").exists() and not (model_dir / "adapter_config.json").exists()
    assert (model_dir / "adapter" / "adapter_config.json").exists()
    merged = load_causal_lm(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(quick_run / "model")
    assert type(merged) is type(base)
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # only the LoRA targets moved
