"""Resumable checkpoints: manifest as commit mark, truncation detection, pruning, the preemption watch."""

import os
import signal

import pytest

from alignlab import checkpoint as ck


def fake_checkpoint(root, step, files=None, commit=True):
    path = ck.checkpoint_path(root, step)
    (path / "model").mkdir(parents=True)
    for name, data in (files or {"model/weights.pt": b"w" * 100, "rng_rank0.pt": b"r" * 10}).items():
        (path / name).write_bytes(data)
    if commit:
        ck.write_manifest(path, step, state={"kl_coef": 0.1}, config={"seed": 0}, world_size=1)
    return path


def test_manifest_commits_a_checkpoint_and_records_sizes(tmp_path):
    path = fake_checkpoint(tmp_path, 40)
    manifest = ck.read_manifest(path)
    assert manifest["files"] == {"model/weights.pt": 100, "rng_rank0.pt": 10}
    assert manifest["step"] == 40 and manifest["state"] == {"kl_coef": 0.1}
    assert ck.verify(path) is None


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "model" / "weights.pt").write_bytes(b"w" * 60), "truncated"),
        (lambda p: (p / "rng_rank0.pt").unlink(), "missing"),
        (lambda p: (p / ck.MANIFEST).unlink(), "did not finish"),
        (lambda p: (p / ck.MANIFEST).write_text('{"step": 4'), "unreadable"),
    ],
)
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog, damage, reason):
    fake_checkpoint(tmp_path, 40)
    newest = fake_checkpoint(tmp_path, 62)
    damage(newest)
    assert reason in ck.verify(newest)
    with caplog.at_level("WARNING"):
        step, path = ck.latest_intact(tmp_path)
    assert (step, path.name) == (40, "checkpoint-40")
    assert "checkpoint-62 is unusable" in caplog.text and reason in caplog.text


def test_an_unfinished_save_is_not_a_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 10, commit=False)
    assert ck.latest_intact(tmp_path) is None
    assert ck.latest_intact(tmp_path / "nowhere") is None


def test_checkpoints_sort_by_step_not_by_name(tmp_path):
    for step in (9, 10, 100):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-final").mkdir()  # not ours: ignored
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [100, 10, 9]


def test_prune_keeps_the_newest_intact_ones_and_nothing_older(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    broken = fake_checkpoint(tmp_path, 40)
    (broken / "rng_rank0.pt").write_bytes(b"")  # truncated: it does not count as one of the kept
    ck.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]


def test_rng_state_round_trip():
    import random

    import numpy as np
    import torch

    state = ck.rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_draws_inside_rng_untouched_leave_the_next_draws_as_they_were():
    import random

    import numpy as np
    import torch

    state = ck.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(state)
    with ck.rng_untouched():
        inside = (random.random(), np.random.rand(), torch.rand(1).item())
    assert inside == expected  # it starts from the state it found ...
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected  # ... and puts it back
    state = ck.rng_state()
    following = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(state)
    with pytest.raises(RuntimeError), ck.rng_untouched():
        random.random(), np.random.rand(3), torch.rand(3)
        raise RuntimeError("an evaluation that fails")
    # put back after a failure too
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == following


def test_preemption_watch_flags_a_signal_and_chains_the_previous_handler():
    seen = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    watch = ck.PreemptionWatch().install()
    try:
        assert not watch.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert watch.requested() and watch.signum == signal.SIGUSR2
        os.kill(os.getpid(), signal.SIGUSR2)  # a repeat (srun and slurmstepd both deliver) changes nothing
        assert watch.signum == signal.SIGUSR2
        assert seen == []  # ours ran, the old one waits for the checkpoint
        watch.chain()  # e.g. submitit's requeue handler, after the checkpoint
        assert seen == [signal.SIGUSR2]
    finally:
        watch.uninstall()
        signal.signal(signal.SIGUSR2, old)
    assert signal.getsignal(signal.SIGUSR2) is old


def test_resume_auto_takes_the_newest_checkpoint_of_the_same_config_and_world_size(tmp_path):
    from omegaconf import OmegaConf

    from alignlab.errors import ConfigError
    from alignlab.lifecycle import newest_checkpoint

    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 10)
    newest = fake_checkpoint(root, 20)  # both made by config {"seed": 0} on 1 rank

    def cfg(resume):
        return OmegaConf.create({"resume": resume, "run_dir": str(tmp_path), "stage": {"name": "sft"}})

    assert newest_checkpoint(cfg("auto"), {"seed": 0}, world_size=1) == (20, newest)
    assert newest_checkpoint(cfg("never"), {"seed": 0}, world_size=1) is None
    assert newest_checkpoint(cfg("auto"), {"seed": 1}, world_size=1) is None  # another config: a fresh start
    with pytest.raises(ConfigError, match="saved by 1 ranks, this run has 2; resume with the same number"):
        newest_checkpoint(cfg("auto"), {"seed": 0}, world_size=2)
    with pytest.raises(ConfigError, match="resume='yes': choose never"):
        newest_checkpoint(cfg("yes"), {"seed": 0}, world_size=1)


def test_the_resume_checks_rejection_sampling_shares(tmp_path):
    from alignlab.errors import ConfigError
    from alignlab.runs import check_world_size, resume_requested

    assert resume_requested("auto") and not resume_requested("never")
    with pytest.raises(ConfigError, match="resume='always': choose never \\(start fresh\\) or auto"):
        resume_requested("always")
    check_world_size(tmp_path, {"world_size": 2}, 2)
    check_world_size(tmp_path, {}, 4)  # a manifest that does not say: taken as this run's
    with pytest.raises(ConfigError, match=f"{tmp_path} was saved by 2 ranks, this run has 4"):
        check_world_size(tmp_path, {"world_size": 2}, 4)
