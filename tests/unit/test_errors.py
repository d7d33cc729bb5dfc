"""alignlab's own errors print one clean line and exit 2; anything else (a bug) keeps its traceback."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import alignlab.__main__ as entry
from alignlab.distributed import grad_accum_steps
from alignlab.errors import EXIT_USER_ERROR, AlignlabError, ConfigError, DataError, MissingInputError
from alignlab.launch import command, needs_relaunch


def test_each_error_is_also_the_builtin_callers_catch():
    for cls, builtin in (
        (ConfigError, ValueError),
        (DataError, ValueError),
        (MissingInputError, FileNotFoundError),
    ):
        with pytest.raises(builtin):  # existing `except ValueError` / pytest.raises(ValueError) still hold
            raise cls("what and how to fix it")
        assert issubclass(cls, AlignlabError)
    assert str(MissingInputError("stage.init_from=x does not exist")) == "stage.init_from=x does not exist"
    assert not issubclass(RuntimeError, AlignlabError)


def hydra_cfg(mode: str = "RUN"):
    from hydra.types import RunMode

    return OmegaConf.create(
        {
            "mode": RunMode[mode],
            "runtime": {"choices": {"stage": "sft"}},
            "overrides": {"task": ["stage=sft"]},
        }
    )


@pytest.fixture
def entry_with(monkeypatch):
    """main() with run() replaced: main is what Hydra calls (its undecorated function)."""

    def patch(error: BaseException, mode: str = "RUN"):
        def run(cfg, hydra):
            raise error

        monkeypatch.setattr(entry, "run", run)
        monkeypatch.setattr("hydra.core.hydra_config.HydraConfig.get", staticmethod(lambda: hydra_cfg(mode)))
        return entry.main.__wrapped__

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for var in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    return patch


def test_an_alignlab_error_is_one_line_and_exit_2(entry_with, capsys):
    main = entry_with(ConfigError("stage.train_on='x' is not one of: last_turn, all_assistant_turns"))
    with pytest.raises(SystemExit) as e:
        main(OmegaConf.create({}))
    assert e.value.code == EXIT_USER_ERROR == 2
    err = capsys.readouterr().err
    assert err == "error: stage.train_on='x' is not one of: last_turn, all_assistant_turns\n"


def test_a_sweep_point_fails_without_stopping_the_sweep(entry_with, capsys):
    # under -m, Hydra records the failed point and runs the others (SystemExit would stop the whole sweep)
    main = entry_with(ConfigError("stage.batch_size=30 must be ..."), mode="MULTIRUN")
    with pytest.raises(ConfigError):
        main(OmegaConf.create({}))
    assert capsys.readouterr().err == "error: stage.batch_size=30 must be ...\n"


def test_hydra_full_error_shows_the_traceback(entry_with, monkeypatch):
    main = entry_with(MissingInputError("stage.init_from=x does not exist"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(MissingInputError):
        main(OmegaConf.create({}))


def test_a_bug_keeps_its_traceback(entry_with):
    # Hydra prints it (and exits 1): not turned into a clean `error:` line that would hide where it happened
    main = entry_with(KeyError("oops"))
    with pytest.raises(KeyError):
        main(OmegaConf.create({}))


def test_ranks_tag_their_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert entry.report(DataError("sft.jsonl, row 3: empty response")) == 2
    assert capsys.readouterr().err == "error (rank 1): sft.jsonl, row 3: empty response\n"


def test_a_relaunch_passes_the_ranks_exit_code_on(monkeypatch):
    # each rank printed its own `error:` line and exited 2: the launcher's command exits 2 too
    from alignlab import launch, validate

    checked = []
    monkeypatch.delenv(launch.CHILD_ENV, raising=False)
    monkeypatch.setattr(validate, "check", lambda cfg, stage, world_size: checked.append((stage, world_size)))
    monkeypatch.setattr(launch, "relaunch", lambda launcher, args: 2)
    cfg = OmegaConf.create({"launcher": {"name": "deepspeed", "nproc": 2}, "run_dir": "/tmp/x"})
    with pytest.raises(SystemExit) as e:
        entry.run(cfg, hydra_cfg())
    assert e.value.code == 2 and checked == [("sft", 2)]  # checked once, before the ranks start


def test_batch_arithmetic_names_the_keys_it_is_given():
    with pytest.raises(ConfigError, match=r"^stage.batch_size=30 must be a positive multiple of stage.micro"):
        grad_accum_steps(30, 8, 2)
    with pytest.raises(ConfigError) as e:
        grad_accum_steps(32, 12, 1, names=("stage.minibatch_size", "stage.micro_batch_size"))
    assert "stage.minibatch_size=32" in str(e.value) and "stage.batch_size" not in str(e.value)
    assert grad_accum_steps(32, 8, 2, names=("a", "b")) == 2


def test_launcher_errors_are_config_errors():
    with pytest.raises(ConfigError, match="launcher.name='mpi'"):
        needs_relaunch("mpi", {})
    with pytest.raises(ConfigError, match="launcher.nproc=0"):
        command("deepspeed", 0, 1234, [])
