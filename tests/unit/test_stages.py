"""The stage registry: its dependency order, the path defaults that follow it, and the docs' copy of its table."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from alignlab.config import register_configs
from alignlab.runs import config_changes
from alignlab.stages import PIPELINE_STAGES, STAGES, recipe_of, stage_table
from tests.conftest import ROOT

register_configs()


def test_every_stage_comes_after_its_inputs():
    for stage in PIPELINE_STAGES:
        inputs = STAGES[stage].inputs
        assert all(PIPELINE_STAGES.index(d) < PIPELINE_STAGES.index(stage) for d in inputs), stage
    assert set(STAGES["eval"].inputs) == set(PIPELINE_STAGES) - {"eval"}  # eval compares every system
    assert "pipeline" not in PIPELINE_STAGES and STAGES["pipeline"].orchestrator


def test_a_preset_runs_another_stages_recipe():
    assert recipe_of("ppo_ptx") == "ppo" and recipe_of("sft") == "sft"
    assert recipe_of("rm_helpful") == "rm_helpful"  # not a stage= option: its own name


def unresolved(stage: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"stage={stage}", *overrides])
    return OmegaConf.to_container(cfg, resolve=False), cfg


def stage_dirs(node) -> set[str]:
    text = str(node)
    return set(re.findall(r"\$\{stage_dir:(\w+)\}", text))


@pytest.mark.parametrize("stage", PIPELINE_STAGES)
def test_a_stages_default_paths_name_only_its_inputs(stage):
    raw, cfg = unresolved(stage)
    assert stage_dirs(raw["stage"]) <= set(STAGES[stage].inputs), "stage.* reads a stage it does not declare"
    if STAGES[stage].uses_reward:
        assert "rm" in STAGES[stage].inputs  # reward.reward_model is the rm stage's model
    # ${stage_dir:x} is the run directory stage=x writes
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for dep in STAGES[stage].inputs:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            dep_cfg = compose(config_name="config", overrides=[f"stage={dep}"])
        assert dep_cfg.run_dir == f"{resolved['paths']['runs']}/{resolved['experiment']['name']}/{dep}"


def test_stage_dir_follows_the_runs_root_and_the_experiment():
    _, cfg = unresolved("ppo", "paths.runs=/r", "experiment.name=e", "reward=llama2")
    assert cfg.stage.init_from == "/r/e/sft/model" and cfg.run_dir == "/r/e/ppo"
    assert (
        cfg.reward.helpful_model == "/r/e/rm_helpful/model"
        and cfg.reward.safety_model == "/r/e/rm_safety/model"
    )


def test_the_reward_decides_the_outputs_of_the_stages_that_score_with_it():
    old, new = {"reward": {"reward_model": "a"}}, {"reward": {"reward_model": "b"}}
    scoring = {s for s in PIPELINE_STAGES if config_changes(s, old, new)}
    assert scoring == {"ppo", "ppo_ptx", "grpo", "rloo", "rejection_sampling", "eval"}
    assert config_changes("rm_helpful", old, new) == []  # a run name, not a stage= option


def test_docs_pipeline_md_holds_the_registrys_table():
    assert stage_table() in (ROOT / "docs" / "pipeline.md").read_text(), (
        "docs/pipeline.md's stage table is stale: paste `python -m alignlab.stages`"
    )


def test_the_registry_prints_its_table_without_torch_or_hydra():
    code = "import sys, runpy; runpy.run_module('alignlab.stages', run_name='__main__'); "
    code += "assert not {'torch', 'hydra'} & set(sys.modules), sorted(sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == stage_table()


def test_a_renamed_key_is_named_with_its_new_name():
    from alignlab.stages import renamed_key

    msg = renamed_key("sft", ["stage.lr=1e-4", "stage.max_new_tokens=32"])
    assert (
        msg
        == "stage.max_new_tokens is now stage.eval_max_new_tokens (stage=sft): use stage.eval_max_new_tokens=32"
    )
    assert "stage.n_prompts=48" in renamed_key("context_distillation", ["+stage.prompts=48"])
    # the same key where it was not renamed (PPO's answer budget) is left to Hydra
    assert renamed_key("ppo", ["stage.max_new_tokens=32"]) is None
    assert renamed_key("no_such_stage", ["stage.max_new_tokens=32"]) is None
    # every renamed key's new name is a field of the stage's schema, the old one is not
    from dataclasses import fields

    for name, spec in STAGES.items():
        names = {f.name for f in fields(spec.schema_node())}
        for old, new in spec.renamed:
            assert new.removeprefix("stage.") in names and old.removeprefix("stage.") not in names, (
                name,
                old,
            )
