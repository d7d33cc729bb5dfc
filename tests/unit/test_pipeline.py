"""stage=pipeline's planning and scheduling: overrides passed through, dependency order, make's rule on resolved
configs, the scheduler on stand-in processes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignlab.recipes import pipeline
from alignlab.recipes.pipeline import (
    Scheduler,
    Step,
    common_overrides,
    decide,
    pipeline_stages,
    progress_of,
    run_order,
    topological,
)
from alignlab.runs import DONE, config_changes, differences
from alignlab.stages import PIPELINE_STAGES, STAGES


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


def test_pipeline_stages_names_the_bad_entry():
    assert pipeline_stages(pipeline_cfg(stages=["sft", "eval"])) == ["sft", "eval"]
    with pytest.raises(ValueError, match="unknown stages \\['kto'\\]"):
        pipeline_stages(pipeline_cfg(stages=["sft", "kto"]))
    with pytest.raises(ValueError, match="each stage once"):
        pipeline_stages(pipeline_cfg(stages=["sft", "sft"]))
    with pytest.raises(ValueError, match="not in stage.stages: \\['ppo'\\]"):
        pipeline_stages(pipeline_cfg(stages=["sft"], rerun=["ppo"]))
    with pytest.raises(ValueError, match="stage.overrides.ppo may not set run_dir"):
        pipeline_stages(pipeline_cfg(overrides={"ppo": ["run_dir=/elsewhere"]}))
    with pytest.raises(ValueError, match="unknown stages \\['pipeline'\\]"):
        pipeline_stages(pipeline_cfg(stages=["pipeline"]))  # an orchestrator is not a stage of the pipeline


def test_topological_order_lists_every_stage_after_its_inputs():
    assert topological(["eval", "rain", "ppo", "rm", "sft", "pretrain"]) == [
        "pretrain", "sft", "rm", "ppo", "rain", "eval"
    ]  # fmt: skip


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
        s: Step(s, [f"stage={s}"], config(s, **stage_fields.get(s, {})), root / s, [d for d in STAGES[s].inputs if d in stages])
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


class FakeProcess:
    """subprocess.Popen for the scheduler: records what it started; the test decides when it exits."""

    def __init__(self, cmd, *, env, **_):
        self.stage, self.env, self.pid, self.returncode = cmd[3].removeprefix("stage="), env, 0, None

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.returncode = -15
        return self.returncode


def scheduler(tmp_path, monkeypatch, stages, jobs, cores=2) -> Scheduler:
    monkeypatch.setattr(pipeline.subprocess, "Popen", FakeProcess)
    steps = {
        s: Step(s, [f"stage={s}"], config(s), tmp_path / s, [d for d in STAGES[s].inputs if d in stages])
        for s in topological(stages)
    }
    decide(steps, set())
    (tmp_path / "logs").mkdir()
    order = run_order(steps, stages)
    return Scheduler(steps, order, jobs, 0, cores, tmp_path / "logs", tmp_path / "pipeline.json", env={})


def stage_exits(st: Step, code: int = 0) -> None:
    if code == 0:
        finish(st.run_dir, st.stage, st.config, when=1.0)
    st.proc.returncode = code


def test_the_stage_heading_the_longest_chain_starts_first(tmp_path, monkeypatch):
    sched = scheduler(tmp_path, monkeypatch, list(PIPELINE_STAGES), jobs=1)
    started = []
    while True:
        sched.advance()
        running = sched.running()
        if not running:
            break
        assert len(running) == 1  # jobs=1
        started.append(running[0].stage)
        stage_exits(running[0])
    # after pretrain the SFT chain (sft -> rm -> ppo_ptx -> eval) is longer than RAIN's; after rm, PPO-ptx's is
    # the longest (docs/pipeline.md); eval reads everything, so it runs last
    assert started[:3] == ["pretrain", "sft", "rm"] and started.index("rain") > started.index("sft")
    assert started[3] == "ppo_ptx" and started[-1] == "eval"
    assert sorted(started) == sorted(PIPELINE_STAGES)
    assert all(st.state == "done" for st in sched.steps.values())
    status = json.loads((tmp_path / "pipeline.json").read_text())
    assert status["eval"]["state"] == "done" and status["eval"]["command"] == [
        "python",
        "-m",
        "alignlab",
        "stage=eval",
    ]


def test_stages_side_by_side_share_the_cores(tmp_path, monkeypatch):
    sched = scheduler(tmp_path, monkeypatch, ["pretrain", "sft", "rain", "eval"], jobs=2, cores=2)
    sched.advance()
    (alone,) = sched.running()
    assert alone.stage == "pretrain" and alone.proc.env["OMP_NUM_THREADS"] == "2"  # alone: every core
    stage_exits(alone)
    sched.advance()
    assert {st.stage: st.proc.env["OMP_NUM_THREADS"] for st in sched.running()} == {"sft": "1", "rain": "1"}


def test_a_failure_starts_nothing_new_and_lets_running_stages_finish(tmp_path, monkeypatch):
    sched = scheduler(tmp_path, monkeypatch, ["pretrain", "sft", "rain", "eval"], jobs=2)
    sched.advance()
    stage_exits(sched.steps["pretrain"])
    sched.advance()
    stage_exits(sched.steps["rain"], code=1)
    finished = sched.advance()
    assert [st.stage for st in finished] == ["rain"] and sched.failed == ["rain"]
    assert sched.steps["sft"].state == "running" and sched.steps["eval"].state == "cancelled"
    stage_exits(sched.steps["sft"])
    assert [st.stage for st in sched.advance()] == ["sft"] and not sched.running()
    assert sched.steps["sft"].state == "done"


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 75), (signal.SIGUSR1, 75), (signal.SIGINT, 130)])
def test_a_signal_goes_to_every_running_stage_and_stops_the_pipeline(tmp_path, monkeypatch, signum, code):
    sched = scheduler(tmp_path, monkeypatch, ["pretrain", "rm", "sft", "rain"], jobs=2)
    sched.advance()
    stage_exits(sched.steps["pretrain"])
    sched.advance()
    sent = []
    monkeypatch.setattr(pipeline.os, "killpg", lambda pid, sig: sent.append(sig))
    # SIGTERM, SIGUSR1: a scheduler's; the stages checkpoint, exit 75 and the requeued pipeline continues them
    with pytest.raises(SystemExit) as stopped:
        sched.on_signal(signum)
    assert stopped.value.code == code and sent == [signum, signum]
    assert {s: st.state for s, st in sched.steps.items()} == {
        "pretrain": "done", "sft": "cancelled", "rm": "pending", "rain": "cancelled"
    }  # fmt: skip


def test_forward_signals_hands_each_signal_to_the_policy_then_restores_the_handlers():
    from alignlab.launch import exit_code_for_signal, forward_signals

    seen, before = [], signal.getsignal(signal.SIGUSR2)
    with forward_signals(seen.append):
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGUSR2, signal.SIGTERM]
    assert signal.getsignal(signal.SIGUSR2) is before
    assert exit_code_for_signal(signal.SIGINT) == 130 and exit_code_for_signal(signal.SIGTERM) == 143
