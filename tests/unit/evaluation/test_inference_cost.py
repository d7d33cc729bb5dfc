"""stage=eval's inference cost: tokens per sampled answer, FLOPs per answer, and the Pareto front of the cost plot."""

from __future__ import annotations

import torch

from alignlab.data.examples import prompt_ids
from alignlab.evaluation.report import pareto
from alignlab.generation import sample
from alignlab.models import count_parameters
from alignlab.recipes.eval import inference_cost
from alignlab.scoring import RewardScorer


def test_sample_counts_each_answers_prompt_and_generated_tokens(tiny_lm, tokenizer):
    prompts = ["hi how like this ?", "a b", "hello ? yes no sure"]
    # an EOS after a few tokens for some rows: bias the EOS logit up
    with torch.no_grad():
        tiny_lm.lm_head.weight[tokenizer.eos_token_id] += 0.5 * tiny_lm.lm_head.weight.mean(0)
    counts: list[int] = []
    answers = sample(tiny_lm, tokenizer, prompts, max_new_tokens=6, temperature=0.0, tokens=counts)
    assert len(counts) == len(answers) == 3
    for p, n in zip(prompts, counts, strict=True):  # each prompt alone: greedy gives the same tokens
        ids = torch.tensor([prompt_ids(tokenizer, p)])
        out = tiny_lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1] :].tolist()
        eos = tokenizer.eos_token_id
        want = ids.shape[1] + (new.index(eos) + 1 if eos in new else len(new))
        assert n == want, (p, n, want)


class TwoModels:
    params = RewardScorer.params  # the scorer's own count: every reward model it runs

    def __init__(self, *models):
        self.models = dict(enumerate(models))


def test_flops_are_two_per_parameter_per_token_of_each_model(tiny_lm, tiny_rm):
    p_policy, p_rm = count_parameters(tiny_lm), count_parameters(tiny_rm)
    assert inference_cost(p_policy, 10.0, None, 0.0)["inference_flops_per_answer"] == 2 * p_policy * 10
    cost = inference_cost(p_policy, 10.0, TwoModels(tiny_rm, tiny_rm), 3.0)
    assert cost["inference_flops_per_answer"] == 2 * (
        p_policy * 10 + 2 * p_rm * 3
    )  # Llama 2's pair: both RMs
    assert (cost["policy_tokens_per_answer"], cost["reward_tokens_per_answer"]) == (10.0, 3.0)


def test_pareto_front_keeps_what_nothing_beats_on_both_axes():
    points = {"a": (1.0, 0.5), "b": (2.0, 0.9), "c": (3.0, 0.8), "d": (0.5, 0.4), "e": (2.0, 0.7)}
    assert pareto(points) == ["d", "a", "b"]  # c costs more than b for less; e costs as much as b for less


def test_training_cost_charges_the_chain_and_spreads_it_over_served_answers(tmp_path):
    from alignlab import compute
    from alignlab.recipes.eval import training_cost

    def run(name, recipe, flops, inputs):
        ledger = compute.Ledger()
        ledger.add("train", flops, 1)
        (tmp_path / name / "model").mkdir(parents=True)
        compute.write(tmp_path / name, recipe, ledger, inputs)
        return str(tmp_path / name / "model")

    base = run("pretrain", "pretrain", 1e12, [])
    sft = run("sft", "sft", 1e9, [base])
    rm = run("rm", "rm", 2e9, [sft])
    # best-of-N: the SFT policy and the reward model it decodes with (SFT charged once)
    cost = training_cost([sft, rm], 1_000, 2.6e9)
    assert cost["training_flops"] == 3e9 and cost["pretraining_flops"] == 1e12
    assert cost["total_flops"] == 3e9 + 1_000 * 2.6e9
    assert set(cost["training_runs"]) == {str(tmp_path / d) for d in ("pretrain", "sft", "rm")}
    # an answers file with no inference cost: no total rather than a wrong one
    assert training_cost([base], 1_000, None)["total_flops"] is None


def test_answer_costs_read_the_file_the_stage_wrote(tmp_path):
    import json

    from alignlab.compute import ANSWER_COSTS
    from alignlab.recipes.eval import answer_costs

    (tmp_path / "samples.jsonl").write_text("")
    assert answer_costs(str(tmp_path / "samples.jsonl"), "rain") == ({}, None)
    methods = {"rain": {"inference_flops_per_answer": 5e9}, "vanilla": {"inference_flops_per_answer": 2e8}}
    (tmp_path / ANSWER_COSTS).write_text(json.dumps({"model": "runs/pretrain/model", "methods": methods}))
    assert answer_costs(str(tmp_path / "samples.jsonl"), "rain") == (methods["rain"], "runs/pretrain/model")
