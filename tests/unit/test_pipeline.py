"""stage=pipeline's planning: overrides passed through, dependency order, make's rule on resolved configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignlab.config import PIPELINE_STAGES
from alignlab.recipes.pipeline import (
    DEPENDS,
    Step,
    check_stages,
    common_overrides,
    decide,
    priority,
    progress_of,
    topological,
)
from alignlab.runs import DONE, config_changes, differences


def test_stages_and_dependencies_agree():
    assert list(DEPENDS) == PIPELINE_STAGES
    for stage, deps in DEPENDS.items():
        assert all(PIPELINE_STAGES.index(d) < PIPELINE_STAGES.index(stage) for d in deps), stage
    assert set(DEPENDS["eval"]) == set(PIPELINE_STAGES) - {"eval"}


def test_common_overrides_drop_the_pipelines_own_keys():
    task = [
        "stage=pipeline", "stage.jobs=1", "+stage.overrides.ppo=[a]", "run_dir=/x", "experiment=quick",
        "paths.runs=/r", "launcher=deepspeed", "+model.extra=1", "~logger.tags", "stages_note=1",
    ]  # fmt: skip
    assert common_overrides(task) == [
        "experiment=quick", "paths.runs=/r", "launcher=deepspeed", "+model.extra=1", "~logger.tags", "stages_note=1"
    ]  # fmt: skip


def pipeline_cfg(**kw):
    base = {"stages": list(PIPELINE_STAGES), "rerun": [], "overrides": {s: [] for s in PIPELINE_STAGES}}
    return OmegaConf.create({**base, **kw})


def test_check_stages_names_the_bad_entry():
    assert check_stages(pipeline_cfg(stages=["sft", "eval"])) == ["sft", "eval"]
    with pytest.raises(ValueError, match="unknown stages \\['dpo'\\]"):
        check_stages(pipeline_cfg(stages=["sft", "dpo"]))
    with pytest.raises(ValueError, match="each stage once"):
        check_stages(pipeline_cfg(stages=["sft", "sft"]))
    with pytest.raises(ValueError, match="not in stage.stages: \\['ppo'\\]"):
        check_stages(pipeline_cfg(stages=["sft"], rerun=["ppo"]))
    with pytest.raises(ValueError, match="stage.overrides.ppo may not set run_dir"):
        check_stages(pipeline_cfg(overrides={"ppo": ["run_dir=/elsewhere"]}))


def test_topological_order_and_longest_chain_first():
    assert topological(["eval", "rain", "ppo", "rm", "sft", "pretrain"]) == [
        "pretrain", "sft", "rm", "ppo", "rain", "eval"
    ]  # fmt: skip
    everything = list(PIPELINE_STAGES)
    # after pretrain, the SFT chain (sft -> rm -> ppo_ptx -> eval) is longer than RAIN's: it starts first
    assert priority("sft", everything) > priority("rain", everything)
    after_rm = ["ppo", "ppo_ptx", "rejection_sampling", "context_distillation"]
    assert max(after_rm, key=lambda s: priority(s, everything)) == "ppo_ptx"
    assert priority("eval", everything) == 2


def test_differences_report_leaves_and_whole_subtrees():
    old = {"stage": {"lr": 1e-5, "systems": {"a": {"n": 8}, "b": {"n": 1}}}, "seed": 0}
    new = {"stage": {"lr": 3e-5, "systems": {"a": {"n": 8}, "c": {"n": 1}}}, "seed": 0}
    assert differences(old, new) == [
        "stage.lr: 1e-05 -> 3e-05", "stage.systems.b: removed", "stage.systems.c: added"
    ]  # fmt: skip


def config(stage: str, **stage_fields) -> dict:
    return {
        "stage": {"name": stage, **stage_fields},
        "model": {"name": "tinyhh"},
        "data": {"name": "tinyhh", "cache_dir": "/a"},
        "reward": {"reward_model": "/runs/rm/model"},
        "seed": 0,
        "logger": {"name": "jsonl"},
    }


def test_config_changes_ignore_how_a_stage_runs_and_where_data_is_cached():
    old = config("sft", lr=1e-5)
    new = {
        **config("sft", lr=1e-5),
        "logger": {"name": "wandb"},
        "data": {"name": "tinyhh", "cache_dir": "/b"},
    }
    assert config_changes("sft", old, new) == []
    new["reward"] = {"reward_model": "/other"}
    assert config_changes("sft", old, new) == []  # SFT does not read the reward model ...
    assert config_changes("ppo", config("ppo"), {**config("ppo"), "reward": {"reward_model": "/other"}}) == [
        "reward.reward_model: /runs/rm/model -> /other"
    ]  # ... PPO does
    many = config("sft", a=1, b=1, c=1, d=1, e=1)
    assert config_changes("sft", many, config("sft", a=2, b=2, c=2, d=2, e=2))[-1] == "2 more"


def finish(run_dir: Path, stage: str, cfg: dict, when: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DONE).write_text(json.dumps({"stage": stage, "finished": when, "wall_s": 1.0, "config": cfg}))


def make_steps(root: Path, **stage_fields) -> dict[str, Step]:
    stages = ["pretrain", "sft", "rm", "ppo", "rain"]
    return {
        s: Step(s, [f"stage={s}"], config(s, **stage_fields.get(s, {})), root / s, [d for d in DEPENDS[s] if d in stages])
        for s in stages
    }  # fmt: skip


def test_decide_applies_makes_rule_to_resolved_configs(tmp_path):
    steps = make_steps(tmp_path)
    decide(steps, set())
    assert {s: st.reason for s, st in steps.items()} == dict.fromkeys(steps, "not run yet")

    for i, s in enumerate(["pretrain", "sft", "rm", "ppo", "rain"]):
        finish(tmp_path / s, s, config(s), when=100.0 + i)
    steps = make_steps(tmp_path)
    decide(steps, set())
    assert all(st.reason is None and st.state == "skipped" for st in steps.values())

    # a changed config re-runs that stage and everything downstream of it, not its siblings
    steps = make_steps(tmp_path, rm={"lr": 9.0})
    decide(steps, set())
    assert steps["rm"].reason == "config changed: stage.lr: added"
    assert steps["ppo"].reason == "its input rm runs again"
    assert steps["pretrain"].reason is steps["sft"].reason is steps["rain"].reason is None

    # an input finished after its consumer (re-run by hand): the consumer is stale
    finish(tmp_path / "pretrain", "pretrain", config("pretrain"), when=200.0)
    steps = make_steps(tmp_path)
    decide(steps, set())
    assert steps["sft"].reason == "its input pretrain finished after it"
    assert steps["rain"].reason == "its input pretrain finished after it"

    # asked for; and a directory without the marker is an interrupted run
    finish(tmp_path / "pretrain", "pretrain", config("pretrain"), when=50.0)
    (tmp_path / "rain" / DONE).unlink()
    steps = make_steps(tmp_path)
    decide(steps, {"sft"})
    assert steps["sft"].reason == "asked (stage.rerun)" and steps["rm"].reason == "its input sft runs again"
    assert steps["rain"].reason == "unfinished (no done.json)" and steps["pretrain"].reason is None

    # an interrupted run that started after its inputs finished continues from its checkpoint (resume=auto) ...
    (tmp_path / "rain" / "config.yaml").write_text("started\n")
    steps = make_steps(tmp_path)
    decide(steps, set())
    assert steps["rain"].reason.endswith("continues from its newest checkpoint (resume=auto)")
    assert steps["rain"].args[-1] == "resume=auto"
    # ... but not when its input runs again
    steps = make_steps(tmp_path)
    decide(steps, {"pretrain"})
    assert steps["rain"].reason == "unfinished (no done.json)" and "resume=auto" not in steps["rain"].args


def test_progress_of_reads_the_last_bar_position(tmp_path):
    log = tmp_path / "ppo.log"
    assert progress_of(log) == ""
    log.write_text("loading\nppo:  10%|#  | 10/100 [00:01<00:09]\rppo:  45%|#### | 45/100 [00:05<00:06]")
    assert progress_of(log) == " 45/100"
    with open(log, "a") as f:  # a model loading bar after it is not the stage's progress
        f.write("\nLoading weights: 100%|##########| 39/39 [00:00<00:00, 9976.08it/s]\n")
    assert progress_of(log) == " 45/100"
