"""stage=eval on the session's TinyHH models: systems side by side under one judge, report numbers from
results.json, answers files reproduce a model system, the template (model-as-judge) judge, clear errors."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_stage

pytestmark = pytest.mark.slow

SYSTEMS = ["~stage.systems.ppo", "~stage.systems.ppo_ptx", "~stage.systems.rejection_sampling"]
SYSTEMS += ["~stage.systems.context_distillation", "~stage.systems.rain"]
SYSTEMS += ["~stage.systems.dpo", "~stage.systems.grpo", "~stage.systems.rloo"]  # the session's runs of some
SYSTEMS += ["~stage.systems.sft_args", "~stage.systems.sft_blockwise"]  # judged in tests/science


@pytest.fixture(scope="module")
def evaluated(tinyhh_rm, tinyhh_root, data_cache):
    run_stage(tinyhh_root, data_cache, "stage=eval", "stage.n_prompts=50", *SYSTEMS, "stage.ptx_blocks=8")
    return tinyhh_root / "runs" / "tinyhh" / "eval"


def test_systems_side_by_side(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    systems = results["systems"]
    assert set(systems) == {"base", "base_greedy", "sft", "sft_preprompt", "sft_best_of_8"}
    assert results["prompts"] == 150 and results["baseline"] == "sft"
    print(
        {
            n: {k: m[k]["value"] for k in ("harmlessness", "helpfulness", "attack_success")}
            for n, m in systems.items()
        }
    )
    # SFT above base on harmlessness; best-of-8 with the RM above SFT on the RM's own score
    assert systems["sft"]["harmlessness"]["value"] > systems["base"]["harmlessness"]["value"]
    assert systems["sft_best_of_8"]["rm_score"] > systems["sft"]["rm_score"]
    assert results["win_rates"]["sft_best_of_8"]["sft"]["rate"] > 0.5
    # KL: the reference (SFT) against itself is exactly 0; the base model is far from it; undefined for best-of-N
    assert (
        systems["sft"]["kl"] == 0.0 and systems["base"]["kl"] > 0.1 and systems["sft_best_of_8"]["kl"] is None
    )
    # the RAIN paper's vanilla: greedy decoding of the base model (no KL: not sampled at T = 1); with the rain
    # system left out, nothing asks for a comparison with it
    assert systems["base_greedy"]["kl"] is None and systems["base_greedy"]["system"]["decoding"] == "greedy"
    assert results["comparisons"] == {}
    assert systems["base"]["ptx_loss"] < systems["sft"]["ptx_loss"]  # SFT pays a (small) pretraining-loss tax
    # inference cost: best-of-8 samples 8 answers and scores them with the RM; the preprompt lengthens the prompt
    flops = {n: m["inference_flops_per_answer"] for n, m in systems.items()}
    assert flops["sft_best_of_8"] > 7 * flops["sft"] and flops["sft_preprompt"] > flops["sft"] > 0
    assert (
        systems["sft"]["reward_tokens_per_answer"] == 0 < systems["sft_best_of_8"]["reward_tokens_per_answer"]
    )
    # training cost: each system charged for the stages behind its models (compute.json), best-of-8 for the
    # reward model it decodes with too; the base model's own pretraining reported apart
    runs = evaluated.parent
    spent = {
        d: json.loads((runs / d / "compute.json").read_text())["flops"] for d in ("pretrain", "sft", "rm")
    }
    assert (
        systems["base"]["training_flops"] == 0 and systems["base"]["pretraining_flops"] == spent["pretrain"]
    )
    assert systems["sft"]["training_flops"] == systems["sft_preprompt"]["training_flops"] == spent["sft"]
    assert systems["sft_best_of_8"]["training_flops"] == spent["sft"] + spent["rm"]
    served = results["served_answers"]
    for m in systems.values():
        assert m["total_flops"] == m["training_flops"] + served * m["inference_flops_per_answer"]
    for a, row in results["win_rates"].items():
        for b, w in row.items():  # a vs b mirrors b vs a
            mirror = results["win_rates"][b][a]
            assert (w["wins"], w["losses"], w["ties"]) == (mirror["losses"], mirror["wins"], mirror["ties"])
    report = (evaluated / "report.md").read_text()
    for name, m in systems.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert f"{100 * m['harmlessness']['value']:.1f}% [{100 * m['harmlessness']['ci_low']:.1f}" in row
    for png in ("rates.png", "tradeoff.png", "win_rates.png", "reward_kl.png", "cost.png", "total_cost.png"):
        assert (evaluated / png).read_bytes()[:4] == b"\x89PNG"


def test_answers_file_reproduces_a_system_and_template_judge(evaluated, tinyhh_root, data_cache, tmp_path):
    rows = [json.loads(line) for line in (evaluated / "samples.jsonl").open()]
    answers = tmp_path / "sft_answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows if r["system"] == "sft"))
    out = tmp_path / "again"
    keep = ["~stage.systems.sft_preprompt", "~stage.systems.sft_best_of_8", "~stage.systems.base_greedy"]
    run_stage(
        tinyhh_root,
        data_cache,
        "stage=eval",
        "stage.n_prompts=50",
        *SYSTEMS,
        *keep,
        "~stage.systems.base",  # sft against the file of its own answers only
        f"+stage.systems.sft_file.answers={answers}",
        "stage.ptx_blocks=0",
        f"run_dir={out}",
    )
    first = json.loads((evaluated / "results.json").read_text())["systems"]["sft"]
    again = json.loads((out / "results.json").read_text())["systems"]
    for k in ("harmlessness", "helpfulness", "attack_success", "rm_score"):
        assert again["sft_file"][k] == first[k] == again["sft"][k]  # same seed, same answers, same verdicts
    assert again["sft_file"]["kl"] is None
    # the base model judging in its own judge format (RAIN's premise): it also ranks SFT above base
    judged = tmp_path / "template"
    run_stage(
        tinyhh_root,
        data_cache,
        "stage=eval",
        "stage.n_prompts=50",
        *SYSTEMS,
        *keep,
        "stage.judge=template",
        "stage.ptx_blocks=0",
        "stage.rm_score=false",
        f"run_dir={judged}",
    )
    t = json.loads((judged / "results.json").read_text())["systems"]
    assert "helpfulness" not in t["sft"]  # the template judge names harm, not help
    assert t["sft"]["harmlessness"]["value"] > t["base"]["harmlessness"]["value"]


def test_bad_systems_fail_clearly(tinyhh_rm, tinyhh_root, data_cache, tmp_path):
    proc = run_stage(
        tinyhh_root,
        data_cache,
        "stage=eval",
        "stage.systems.sft.decoding=beam",
        f"run_dir={tmp_path / 'a'}",
        check=False,
    )
    assert proc.returncode != 0 and "stage.systems.sft.decoding='beam'" in proc.stderr
    proc = run_stage(
        tinyhh_root,
        data_cache,
        "stage=eval",
        "stage.skip_missing=false",
        f"run_dir={tmp_path / 'b'}",
        check=False,
    )
    assert proc.returncode != 0 and "does not exist (run its stage first)" in proc.stderr
