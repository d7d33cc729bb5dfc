"""Every group option composes against the typed schema; bad keys and types fail with Hydra's readable error."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from alignlab.config import STAGES, register_configs
from tests.conftest import ROOT, alignlab

register_configs()
GROUPS = {
    g: sorted(p.stem for p in (ROOT / "conf" / g).glob("*.yaml"))
    for g in ("model", "data", "launcher", "deepspeed", "logger", "experiment", "reward")
}


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes(stage, group, option):
    overrides = [f"stage={stage}", f"{group}={option}"]
    if (group, option) == ("data", "local"):
        overrides.append("data.source=/tmp/x.jsonl")
    cfg = compose_cfg(*overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["stage"]["name"] == stage
    assert resolved["run_dir"].endswith(f"/{resolved['experiment']['name']}/{stage}")


def test_every_group_has_options():
    assert all(GROUPS.values()), GROUPS
    assert {"zero0", "zero2", "zero3"} <= set(GROUPS["deepspeed"])
    assert {"local", "deepspeed"} <= set(GROUPS["launcher"])


def test_deepspeed_presets_set_their_stage():
    for name, stage in (("zero0", 0), ("zero2", 2), ("zero3", 3)):
        assert compose_cfg("stage=pretrain", f"deepspeed={name}").deepspeed.zero_stage == stage


def test_experiment_preset_overrides_only_what_differs():
    default, quick = compose_cfg("stage=pretrain"), compose_cfg("stage=pretrain", "experiment=quick")
    assert quick.stage.steps < default.stage.steps
    assert quick.stage.lr == default.stage.lr
    assert quick.run_dir.endswith("quick/pretrain")


def test_unknown_key_is_rejected():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        compose_cfg("stage=pretrain", "stage.lrr=1e-3")
    assert "lrr" in str(e.value) + str(e.value.__cause__)


def test_wrong_type_is_rejected():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose_cfg("stage=pretrain", "stage.steps=many")
    assert "many" in str(e.value) + str(e.value.__cause__)


def test_cli_errors_are_readable(tmp_path):
    proc = alignlab("stage=pretrain", "stage.lrr=1e-3", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "lrr" in proc.stderr and "Traceback" not in proc.stderr
    proc = alignlab("stage=pretrain", "deepspeed.zero_stage=two", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "two" in proc.stderr
    proc = alignlab(cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "stage" in proc.stderr and "pretrain" in proc.stderr


def test_help_and_cfg_job(tmp_path):
    out = alignlab("--help", cwd=tmp_path).stdout
    stages = "stage: context_distillation, dpo, eval, grpo, pipeline, ppo, ppo_ptx, pretrain, rain, rejection_sampling, rloo, rm, sft"
    assert stages in out and "deepspeed: zero0, zero2, zero3" in out
    out = alignlab("stage=pretrain", "stage.lr=0.01", "--cfg", "job", cwd=tmp_path).stdout
    cfg = OmegaConf.create(out)
    assert cfg.stage.lr == 0.01 and cfg.deepspeed.name == "zero0"
    assert not (tmp_path / "runs").exists()  # printing the config runs nothing


@pytest.mark.parametrize("experiment", ["tinyhh", "quick"])
def test_pipeline_overrides_compose_and_keep_rain_and_eval_on_the_same_prompts(experiment):
    overrides = compose_cfg("stage=pipeline", f"experiment={experiment}").stage.overrides
    n = {
        s: compose_cfg(f"stage={s}", f"experiment={experiment}", *overrides[s]).stage.n_prompts
        for s in ("rain", "eval")
    }
    assert n["rain"] == n["eval"], n  # eval's rain system answers exactly RAIN's prompts
    for stage, extra in overrides.items():
        compose_cfg(f"stage={stage}", f"experiment={experiment}", *extra)  # every budget key exists
