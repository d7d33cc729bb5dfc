"""Every key and value is checked before anything in a run directory is touched (alignlab/validate.py), and a
model that is not TinyHH's never meets TinyHH's data, prompts or oracle silently (alignlab/tinyhh/recognise.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignlab import validate
from alignlab.config import STAGES
from alignlab.errors import ConfigError, MissingInputError
from alignlab.stages import recipe_of
from alignlab.tinyhh.emitters import Sizes, ensure
from tests.config.test_compose import compose_cfg
from tests.conftest import alignlab

QUICK_SIZES = dict(
    n_corpus=3000, n_preprompt=200, n_sft=300, n_pref=600, n_rl_prompts=200, n_eval=40, n_ranked=300
)


def problems(*overrides: str, world: int = 1) -> list[str]:
    """The choice and arithmetic problems of a composed config (no files needed)."""
    cfg = compose_cfg(*overrides)
    stage = next(o.split("=", 1)[1] for o in overrides if o.startswith("stage="))
    recipe = recipe_of(stage)
    validate.resolve(cfg)
    found = [
        p for k, c in validate.choice_table(cfg, recipe).items() if (p := validate.bad_choice(cfg, k, c))
    ]
    return found + validate.stage_problems(cfg, recipe, world)


@pytest.mark.parametrize("experiment", ["tinyhh", "quick"])
@pytest.mark.parametrize("stage", sorted(set(STAGES) - {"eval"}))
def test_every_stage_default_is_valid(stage, experiment):
    assert problems(f"stage={stage}", f"experiment={experiment}") == []


def test_eval_default_only_misses_its_systems(tmp_path):
    # nothing has run under this paths.runs: every system is skipped, so nothing is left to evaluate
    assert problems("stage=eval", f"paths.runs={tmp_path}") == [
        "no system to evaluate: every model / answers file of stage.systems is missing"
    ]


# (stage, override, the choices the message lists): a value outside a set no Enum holds (transformers' schedulers,
# ZeRO stages, TinyHH's prompt sets, eval's systems, pipeline stages); Enum fields fail earlier, at compose time
# (test_choices.py)
BAD_CHOICES = [
    ("sft", "stage.lr_scheduler=cosine_forever", "cosine_with_min_lr"),
    ("dpo", "stage.lr_scheduler=cosine_forever", "cosine_with_min_lr"),
    ("rejection_sampling", "stage.finetune.lr_scheduler=cosine_forever", "cosine_with_min_lr"),
    ("sft", "deepspeed.zero_stage=4", "0, 1, 2, 3"),
    ("rain", "stage.prompt_sets=[harmful,toxic]", "harmful, benign, attack"),
    ("eval", "stage.systems.sft.decoding=beam", "sample, greedy, best_of_n"),
    ("pipeline", "stage.stages=[sft,kto]", "pretrain, sft, rm"),
    ("pipeline", "stage.rerun=[kto]", "pretrain, sft, rm"),
]


@pytest.mark.parametrize("stage,override,choices", BAD_CHOICES, ids=[f"{s}:{o}" for s, o, _ in BAD_CHOICES])
def test_a_bad_choice_names_key_value_and_choices(stage, override, choices):
    key, value = override.split("=", 1)
    value = value.strip("[]").split(",")[-1]
    found = [p for p in problems(f"stage={stage}", override) if p.startswith(f"{key}=")]
    assert len(found) == 1, problems(f"stage={stage}", override)
    assert (f"{key}={value!r}" in found[0] or f"{key}={value} " in found[0]) and choices in found[0]


def test_batch_arithmetic_names_the_real_keys():
    (p,) = problems("stage=sft", "stage.batch_size=30")
    assert "stage.batch_size=30" in p and "stage.micro_batch_size=16" in p
    assert problems("stage=sft", world=2) == [] and "world size 3" in problems("stage=sft", world=3)[0]
    (p,) = problems("stage=dpo", "stage.batch_size=24")
    assert "stage.batch_size=24" in p and "stage.micro_batch_size=16" in p
    (p,) = problems("stage=rejection_sampling", "stage.finetune.micro_batch_size=12")
    assert "stage.finetune.batch_size=32" in p and "stage.finetune.micro_batch_size=12" in p
    # PPO's minibatch is split into micro-batches: the message names minibatch_size, not a batch_size it lacks
    (p,) = problems("stage=ppo", "stage.minibatch_size=32", "stage.micro_batch_size=12")
    assert "stage.minibatch_size=32" in p and "stage.micro_batch_size=12" in p and "stage.batch_size" not in p
    (p,) = problems("stage=ppo", "stage.minibatch_size=24")
    assert "stage.rollout_batch_size=64" in p and "stage.minibatch_size=24" in p


def test_dpo_nll_weight_must_not_be_negative():
    (p,) = problems("stage=dpo", "stage.sft_weight=-0.5")
    assert "stage.sft_weight=-0.5" in p and ">= 0" in p
    assert problems("stage=dpo", "stage.sft_weight=0.2") == []


def test_contradicting_settings():
    assert "LoRA needs pretrained weights" in problems("stage=pretrain", "model.lora.enabled=true")[0]
    assert "needs model.tokenizer" in problems("stage=pretrain", "data=hh_rlhf")[0]
    assert "needs deepspeed.zero_stage=3" in problems("stage=sft", "deepspeed.offload_param=true")[0]
    assert "stage.ptx_source" in problems("stage=ppo_ptx", "data=hh_rlhf")[0]
    (p,) = problems("stage=pipeline", "stage.stages=[sft]", '+stage.overrides.kto=["stage.lr=1"]')
    assert "stage.overrides.kto" in p


def test_every_problem_is_listed_at_once():
    cfg = compose_cfg(
        "stage=sft", "stage.lr_scheduler=bogus", "deepspeed.offload_param=true", "stage.batch_size=30"
    )
    with pytest.raises(ConfigError) as e:
        validate.check(cfg, "sft", world_size=1)
    assert str(e.value).startswith("3 bad settings:")
    assert all(
        k in str(e.value)
        for k in ("stage.lr_scheduler='bogus'", "deepspeed.offload_param=true", "stage.batch_size=30")
    )


def test_adaptive_kl_needs_a_target_and_a_horizon():
    (p,) = problems("stage=ppo", "stage.kl_controller=adaptive", "stage.kl_horizon=0")
    assert p == "stage.kl_controller=adaptive needs stage.kl_target > 0 and stage.kl_horizon > 0 (got 6.0, 0)"
    assert problems("stage=ppo", "stage.kl_controller=adaptive") == []


def test_unset_and_unresolvable_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"data.source is not set: pass data.source="):
        validate.check(compose_cfg("stage=sft", "data=local"), "sft", world_size=1)
    with pytest.raises(ConfigError, match="nowhere"):
        validate.check(compose_cfg("stage=sft", "stage.init_from=${paths.nowhere}"), "sft", world_size=1)


def test_a_missing_input_names_the_stage_to_run(tmp_path):
    cfg = compose_cfg("stage=rm", f"paths.runs={tmp_path}")
    with pytest.raises(
        MissingInputError, match=r"stage.init_from=.*run `python -m alignlab stage=sft` first"
    ):
        validate.check(cfg, "rm", world_size=1)


# ---------------------------------------------------------------- a finished run keeps every byte


def finished_run(run_dir: Path) -> dict[str, str]:
    """A finished run directory written by hand (done.json, config.yaml, metrics, a checkpoint, the model);
    returns path -> sha256 of every file."""
    files = {
        "done.json": json.dumps({"stage": "sft", "finished": 1.0}),
        "config.yaml": "stage:\n  name: sft\n",
        "metrics.jsonl": '{"step": 1, "train/loss": 2.0}\n',
        "checkpoints/checkpoint-5/manifest.json": '{"step": 5}',
        "checkpoints/checkpoint-5/weights.bin": "w",
        "model/config.json": "{}",
    }
    for name, text in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    return digest(run_dir)


def digest(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "overrides,expected",
    [
        # a choice outside an Enum's set: Hydra's own error at compose time (exit 1, as for an unknown key)
        (
            ["stage=sft", "stage.train_on=bogus"],
            "Invalid value 'bogus', expected one of [last_turn, all_assistant_turns]\n    full_key: stage.train_on",
        ),
        (
            ["stage=sft", "stage.lr_scheduler=bogus"],
            "error: stage.lr_scheduler='bogus' is not one of: linear,",
        ),
        (
            ["stage=ppo", "stage.minibatch_size=32", "stage.micro_batch_size=12"],
            "error: stage.minibatch_size=32 must be",
        ),
        # under a launcher the checks run before the ranks start
        (
            ["stage=rm", "stage.margin=huge", "launcher=deepspeed", "launcher.nproc=2"],
            "Invalid value 'huge', expected one of [none, small, large]\n    full_key: stage.margin",
        ),
        (
            ["stage=rm", "stage.batch_size=30", "launcher=deepspeed", "launcher.nproc=2"],
            "error: stage.batch_size=30",
        ),
    ],
)
def test_a_bad_value_leaves_a_finished_run_untouched(tmp_path, overrides, expected):
    stage = overrides[0].split("=")[1]
    run_dir = tmp_path / "runs" / "tinyhh" / stage
    before = finished_run(run_dir)
    proc = alignlab(*overrides, f"paths.runs={tmp_path / 'runs'}", cwd=tmp_path, check=False)
    assert proc.returncode == (2 if expected.startswith("error:") else 1), proc.stderr[-3000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr and "launching" not in proc.stderr
    assert digest(run_dir) == before


# ---------------------------------------------------------------- TinyHH's data only with a TinyHH model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    from tests.zoo.families import build

    return build("gpt2", tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def tinyhh_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("data_cache")
    ensure(cache, Sizes(**QUICK_SIZES))
    return cache


@pytest.fixture(scope="module")
def tinyhh_model(tmp_path_factory, tinyhh_cache) -> Path:
    """A directory holding the quick TinyHH tokenizer, as every TinyHH stage's model/ does (the check reads nothing
    else)."""
    out = tmp_path_factory.mktemp("tinyhh_model") / "model"
    shutil.copytree(next(tinyhh_cache.glob("tinyhh-*")) / "tokenizer", out)
    return out


def check(*overrides: str, cache: Path) -> None:
    cfg = compose_cfg(*overrides, "experiment=quick", f"paths.data={cache}")
    validate.check(cfg, cfg.stage.name, world_size=1)


def test_a_tinyhh_model_runs_on_tinyhh_data(tinyhh_model, tinyhh_cache, tmp_path):
    check("stage=sft", f"stage.init_from={tinyhh_model}", cache=tinyhh_cache)
    # a TinyHH model trained on other sizes (quick) is still TinyHH's under the default sizes, whose data is not
    # generated yet: its tokenizer is trained in memory for the comparison, and nothing is written
    cfg = compose_cfg("stage=rm", f"stage.init_from={tinyhh_model}", f"paths.data={tmp_path}")
    validate.check(cfg, "rm", world_size=1)
    assert list(tmp_path.iterdir()) == []


def test_forgetting_data_is_an_error_naming_data(zoo, tinyhh_cache):
    with pytest.raises(ConfigError) as e:
        check("stage=sft", f"stage.init_from={zoo}", cache=tinyhh_cache)
    message = str(e.value)
    assert f"stage.init_from={zoo}: not a TinyHH model" in message
    assert "data.source=tinyhh (data=tinyhh is the default)" in message
    assert "data=local data.source=" in message and "data=hh_rlhf" in message
    assert "data.tinyhh_any_model=true" in message


def test_the_opt_in_and_other_data_are_fine(zoo, tinyhh_cache, tmp_path):
    check("stage=sft", f"stage.init_from={zoo}", "data.tinyhh_any_model=true", cache=tinyhh_cache)
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "hi", "completion": "there"}\n')
    check("stage=sft", f"stage.init_from={zoo}", "data=local", f"data.source={data}", cache=tinyhh_cache)


def test_a_hub_model_is_not_tinyhh(tinyhh_cache):
    with pytest.raises(
        ConfigError, match="stage.init_from=EleutherAI/pythia-410m-deduped: not a TinyHH model"
    ):
        check("stage=sft", "stage.init_from=EleutherAI/pythia-410m-deduped", cache=tinyhh_cache)


def test_every_model_of_the_stage_is_checked(zoo, tinyhh_model, tinyhh_cache):
    # PPO: the policy is TinyHH's, the critic and the reward model are not
    with pytest.raises(ConfigError) as e:
        check(
            "stage=ppo_ptx",
            f"stage.init_from={tinyhh_model}",
            f"stage.value_from={zoo}",
            f"reward.reward_model={zoo}",
            cache=tinyhh_cache,
        )
    assert f"stage.value_from={zoo} and reward.reward_model={zoo}: not a TinyHH model" in str(e.value)
    assert "stage.init_from" not in str(e.value)
    with pytest.raises(ConfigError, match=f"reward.safety_model={zoo}"):
        check(
            "stage=rejection_sampling",
            f"stage.init_from={tinyhh_model}",
            "reward=llama2",
            f"reward.helpful_model={tinyhh_model}",
            f"reward.safety_model={zoo}",
            cache=tinyhh_cache,
        )
    with pytest.raises(ConfigError, match=f"stage.gate_model={zoo}"):
        check(
            "stage=context_distillation",
            f"stage.init_from={tinyhh_model}",
            f"stage.gate_model={zoo}",
            cache=tinyhh_cache,
        )
    # stage=pretrain from scratch builds a TinyHH model; continuing another model on TinyHH's corpus is refused
    check("stage=pretrain", cache=tinyhh_cache)
    with pytest.raises(ConfigError, match=f"model.name_or_path={zoo}"):
        check("stage=pretrain", "stage.from_scratch=false", f"model.name_or_path={zoo}", cache=tinyhh_cache)


def test_rain_and_eval_on_tinyhh_prompts_or_the_oracle(zoo, tinyhh_model, tinyhh_cache, tmp_path):
    with pytest.raises(ConfigError, match=f"stage.init_from={zoo}: .* but stage.prompts=tinyhh"):
        check("stage=rain", f"stage.init_from={zoo}", cache=tinyhh_cache)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    check("stage=rain", f"stage.init_from={zoo}", f"stage.prompts={prompts}", cache=tinyhh_cache)
    systems = [f"+stage.systems.mine.model={zoo}", f"+stage.systems.tiny.model={tinyhh_model}"]
    with pytest.raises(
        ConfigError, match=f"stage.systems.mine.model={zoo}: .* stage.prompts=tinyhh and stage.judge=oracle"
    ):
        check("stage=eval", *systems, cache=tinyhh_cache)
    with pytest.raises(ConfigError, match="stage.judge=oracle"):
        check("stage=eval", *systems, f"stage.prompts={prompts}", cache=tinyhh_cache)
    check(
        "stage=eval",
        *systems,
        f"stage.prompts={prompts}",
        "stage.judge=template",
        f"stage.judge_model={zoo}",
        cache=tinyhh_cache,
    )


def test_a_forgotten_data_fails_before_the_run_directory_is_touched(zoo, tmp_path):
    run_dir = tmp_path / "runs" / "tinyhh" / "sft"
    before = finished_run(run_dir)
    proc = alignlab(
        "stage=sft", f"stage.init_from={zoo}", f"paths.runs={tmp_path / 'runs'}", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "not a TinyHH model" in proc.stderr and "Traceback" not in proc.stderr
    assert digest(run_dir) == before


def test_the_recognition_reads_only_the_tokenizer(tinyhh_cache, zoo):
    from alignlab.tinyhh.recognise import is_tinyhh_tokenizer, tinyhh_vocabulary

    reference = tinyhh_vocabulary(tinyhh_cache, QUICK_SIZES)
    assert is_tinyhh_tokenizer(next(tinyhh_cache.glob("tinyhh-*")) / "tokenizer", reference)
    assert not is_tinyhh_tokenizer(zoo, reference)
    assert not is_tinyhh_tokenizer(zoo / "nothing_here", reference)
    assert OmegaConf.select(compose_cfg("stage=sft"), "data.tinyhh_any_model") is False


def test_a_heldout_split_out_of_range_is_a_problem_before_any_data_work():
    (p,) = problems("stage=sft", "data.tinyhh.heldout_topics=40")
    assert "data.tinyhh.heldout_topics=40" in p and "0..11" in p
    (p,) = problems("stage=ppo", "data.tinyhh.heldout_suffixes=4")
    assert "data.tinyhh.heldout_suffixes=4" in p
    assert problems("stage=sft", "data.tinyhh.heldout_topics=6", "data.tinyhh.heldout_suffixes=1") == []
