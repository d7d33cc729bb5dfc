"""stage=pretrain on 2 CPU processes (DeepSpeed runner with ZeRO-2 and ZeRO-3; torchrun) against the 1-process run."""

from __future__ import annotations

import pytest

from alignlab.distributed import free_port
from alignlab.launch import SHM_BUFFER, SHM_DIR
from alignlab.tracking import read_metrics
from tests.conftest import alignlab

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
# Same global batch (16) either way: 1 rank x 8 x 2 accumulation steps, or 2 ranks x 8. 40 steps with a 5-step
# warmup take the loss from ~6.6 to ~3.4 (a 1-rank run: ~15 s alone on one core).
COMMON = [
    "stage=pretrain",
    "experiment=quick",
    "stage.steps=40",
    "stage.warmup_steps=5",
    "stage.batch_size=16",
    "stage.micro_batch_size=8",
    "stage.log_every=5",
    "stage.eval_every=20",
    "stage.checkpoint_every=10",  # the SIGTERM test below resumes from these
    "stage.sample_eval=0",
]
ZERO2 = ["launcher=deepspeed", "launcher.nproc=2", "deepspeed=zero2"]


def files(run_dir):
    return sorted(
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.is_file() and "checkpoints" not in p.parts
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("single")
    alignlab(*COMMON, f"paths.runs={root}", f"paths.data={data_cache}", cwd=root)
    return root / "quick" / "pretrain"


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, data_cache):
    """The uninterrupted 2-rank ZeRO-2 run: compared with the 1-process run, and with the preempted one."""
    root = tmp_path_factory.mktemp("zero2")
    port = free_port()  # named, so that test_no_shared_memory_left_behind finds this run's buffers
    proc = alignlab(
        *COMMON,
        *ZERO2,
        f"launcher.master_port={port}",
        f"paths.runs={root}",
        f"paths.data={data_cache}",
        cwd=root,
    )
    return root / "quick" / "pretrain", proc, port


def test_no_shared_memory_left_behind(zero2):
    # DeepSpeed's CPU allreduce maps a 66 MB /dev/shm file per rank and never unlinks it; the launcher does
    _, proc, port = zero2
    assert "world_size=2" in proc.stderr
    left = [
        p.name for p in SHM_DIR.iterdir() if (m := SHM_BUFFER.fullmatch(p.name)) and int(m.group(3)) == port
    ]
    assert not left, left


@pytest.mark.parametrize(
    "launcher,zero", [("deepspeed", "zero2"), ("deepspeed", "zero3"), ("torchrun", "zero0")]
)
def test_two_processes_match_one(request, tmp_path, data_cache, single, launcher, zero):
    if (launcher, zero) == ("deepspeed", "zero2"):
        run, proc, _ = request.getfixturevalue("zero2")
    else:
        proc = alignlab(
            *COMMON,
            f"launcher={launcher}",
            "launcher.nproc=2",
            f"deepspeed={zero}",
            f"paths.runs={tmp_path}",
            f"paths.data={data_cache}",
            cwd=tmp_path,
        )
        run = tmp_path / "quick" / "pretrain"
    assert "world_size=2" in proc.stderr
    one, two = read_metrics(single), read_metrics(run)

    # Only rank 0 logs: the same rows, not one per rank (ZeRO-2/3 also report the gradient norm, ZeRO-0 does not).
    def keys(rows):
        return [sorted(k for k in r if k != "train/grad_norm") for r in rows]

    assert keys(one) == keys(two)
    loss1 = [r["train/loss"] for r in one if "train/loss" in r]
    loss2 = [r["train/loss"] for r in two if "train/loss" in r]
    assert loss2[-1] < 0.6 * loss2[0]  # it learned
    assert abs(loss1[-1] - loss2[-1]) < 0.03 * loss1[-1], (loss1, loss2)
    eval1, eval2 = one[-1]["eval/loss"], two[-1]["eval/loss"]
    assert abs(eval1 - eval2) < 0.03 * eval1
    # Only rank 0 wrote the run's files (DeepSpeed's sharded optimizer states under checkpoints/ aside).
    assert files(run) == files(single)
    assert (run / "model" / "model.safetensors").stat().st_size == (
        single / "model" / "model.safetensors"
    ).stat().st_size


def test_sigterm_to_the_launcher_checkpoints_every_rank_and_resume_matches(tmp_path, data_cache, zero2):
    """launcher=deepspeed under a scheduler's SIGTERM: the parent passes it to the ranks (not to DeepSpeed's runner,
    which would kill them mid-save), they checkpoint their ZeRO-2 shards and exit 75, and resume=auto ends exactly
    where the uninterrupted 2-rank run ends (each rank's running loss is part of its checkpoint)."""
    from tests.recipes.test_resume import assert_preempted, comparable, terminate_at

    two = [*COMMON, *ZERO2]
    paths = [f"paths.runs={tmp_path}", f"paths.data={data_cache}"]
    whole = zero2[0]
    cut = tmp_path / "quick" / "cut"
    stopped = terminate_at([*two, *paths, "stage.name=cut"], cut, 15, tmp_path)
    step = assert_preempted(stopped, cut, 15)
    assert step < 40, "the run finished before the signal arrived"
    shards = list((cut / "checkpoints" / f"checkpoint-{step}" / "model").glob("*optim_states.pt"))
    assert len(shards) == 2  # both ranks saved their ZeRO shard at the same step
    resumed = alignlab(*two, *paths, "stage.name=cut", "resume=auto", cwd=tmp_path)
    assert f"(step {step})" in resumed.stderr
    assert comparable(cut) == comparable(whole)
