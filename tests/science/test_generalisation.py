"""Does alignment transfer beyond what it was trained on? TinyHH's generalisation split (docs/tinyhh.md): 6 benign
and 6 harmful topics and one attack suffix that pretraining holds but no SFT or preference data does. SFT trained
on the split world from the session's base model (a split world's corpus and tokenizer are the unsplit world's, so
its base model is the same), then stage=eval of the base and SFT models on the seen and the held-out sets, 100
prompts each (every eval system answers the same sets; the chain's other stages would add minutes of CI and no new
column).

A result, not a direction: the test asserts the held-out columns are measured (rates with intervals, differences
with Newcombe intervals, the report's columns) and the compute accounting of the chain, and prints the numbers
(docs/results.md has them from the full pipeline on the split world)."""

from __future__ import annotations

import json

import pytest

from alignlab.evaluation.report import HELDOUT_RATES, RATES
from tests.conftest import run_stage

pytestmark = pytest.mark.slow

SPLIT = ["data.tinyhh.heldout_topics=6", "data.tinyhh.heldout_suffixes=1"]
KEPT = ("base", "sft")
DROPPED = ("base_greedy", "sft_preprompt", "sft_best_of_8", "sft_args", "sft_blockwise", "rain")
EVAL_PROMPTS = 100


@pytest.fixture(scope="module")
def split_eval(tinyhh_root, data_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    base = root / "runs" / "tinyhh" / "pretrain"
    base.parent.mkdir(parents=True)
    base.symlink_to((tinyhh_root / "runs" / "tinyhh" / "pretrain").resolve(), target_is_directory=True)
    run_stage(root, data_cache, "stage=sft", "stage.sample_eval=0", *SPLIT)
    run_stage(
        root,
        data_cache,
        "stage=eval",
        f"stage.n_prompts={EVAL_PROMPTS}",
        *(f"~stage.systems.{s}" for s in DROPPED),
        *SPLIT,
        timeout=1500,
    )
    runs = root / "runs" / "tinyhh"
    results = json.loads((runs / "eval" / "results.json").read_text())
    keys = [k for k, _ in RATES + HELDOUT_RATES]
    print({n: {k: round(m[k]["value"], 3) for k in keys} for n, m in results["systems"].items()})
    print({n: {k: round(d[k]["value"], 3) for k in keys} for n, d in results["differences"].items()})
    return results, runs


def test_every_system_is_measured_on_seen_and_held_out_sets(split_eval):
    results, runs = split_eval
    assert set(results["systems"]) == set(KEPT)
    for name, m in results["systems"].items():
        for key, _ in RATES + HELDOUT_RATES:
            assert m[key]["n"] == EVAL_PROMPTS, (name, key)
            assert m[key]["ci_low"] <= m[key]["value"] <= m[key]["ci_high"]
    for key, _ in HELDOUT_RATES:  # against the baseline (sft), with its Newcombe interval
        d = results["differences"]["base"][key]
        assert d["ci_low"] <= d["value"] <= d["ci_high"]
    report = (runs / "eval" / "report.md").read_text()
    assert all(label in report for _, label in HELDOUT_RATES)


def test_the_split_world_holds_out_what_it_says(split_eval, data_cache):
    manifests = [json.loads(p.read_text()) for p in data_cache.glob("tinyhh-*/manifest.json")]
    (held,) = [m["heldout"] for m in manifests if m["sizes"]["heldout_topics"] == 6]
    assert (len(held["benign_topics"]), len(held["harmful_topics"]), len(held["suffixes"])) == (6, 6, 1)


def test_each_system_is_charged_for_the_training_behind_it(split_eval):
    results, runs = split_eval
    systems = results["systems"]
    assert systems["base"]["training_flops"] == 0 and systems["base"]["pretraining_flops"] > 0
    sft = json.loads((runs / "sft" / "compute.json").read_text())["flops"]
    # the split world's SFT (a chain of several stages: tests/recipes/test_eval.py)
    assert systems["sft"]["training_flops"] == sft > 0
    for m in systems.values():
        assert (
            m["total_flops"]
            == m["training_flops"] + results["served_answers"] * m["inference_flops_per_answer"]
        )
    assert (runs / "eval" / "total_cost.png").exists()
