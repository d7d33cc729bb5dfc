import pytest
import torch

from alignlab.distributed import deepspeed_config, env_from, expand_nodelist, grad_accum_steps
from alignlab.launch import CHILD_ENV, child_args, child_env, command, needs_relaunch


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[1-2]-ib,b3") == ["a1-ib", "a2-ib", "b3"]


def test_env_from_torchrun_variables():
    env = env_from(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "123"}
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 4, 1, "h", 123)
    assert not env.is_main


def test_env_from_slurm_variables():
    env = env_from(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[10-11]",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu10")
    assert env.master_port == 20000 + 4242


def test_env_single_process_defaults():
    env = env_from({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True) and env.master_port > 0
    # The batch script of a 4-task job is not a rank layout: only srun steps are.
    env = env_from({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu[1-2]"})
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True) and env.master_port > 0


def test_grad_accum_arithmetic():
    assert grad_accum_steps(64, 8, 2) == 4
    with pytest.raises(ValueError, match="stage.batch_size=30 .*micro_batch_size=8"):
        grad_accum_steps(30, 8, 2)


def test_deepspeed_config():
    c = deepspeed_config(
        zero_stage=2,
        micro_batch_size=4,
        grad_accum=2,
        world_size=2,
        grad_clip=1.0,
        dtype=torch.bfloat16,
        extra={"wall_clock_breakdown": True},
    )
    assert c["train_batch_size"] == 16 and c["zero_optimization"]["stage"] == 2
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"] and c["wall_clock_breakdown"]
    with pytest.raises(ValueError, match="zero_stage=5"):
        deepspeed_config(
            zero_stage=5, micro_batch_size=1, grad_accum=1, world_size=1, grad_clip=1.0, dtype=torch.float32
        )
    with pytest.raises(ValueError, match="offload_param"):
        deepspeed_config(
            zero_stage=2,
            micro_batch_size=1,
            grad_accum=1,
            world_size=1,
            grad_clip=1.0,
            dtype=torch.float32,
            offload_param=True,
        )


def test_launch_commands():
    ds = command("deepspeed", 2, 29500, ["stage=pretrain", "launcher=deepspeed"])
    assert ds[1:4] == ["-m", "deepspeed.launcher.runner", "--num_gpus"] and "--no_local_rank" in ds
    assert ds[-4:] == ["--module", "alignlab", "stage=pretrain", "launcher=deepspeed"]
    tr = command("torchrun", 4, 1234, ["stage=pretrain"])
    assert "--nproc_per_node" in tr and tr[-3:] == ["-m", "alignlab", "stage=pretrain"]
    with pytest.raises(ValueError):
        command("local", 1, 1, [])


def test_relaunch_only_outside_children():
    assert needs_relaunch("deepspeed", {}) and not needs_relaunch("deepspeed", {CHILD_ENV: "1"})
    assert not needs_relaunch("local", {})
    with pytest.raises(ValueError, match="launcher.name='mpi'"):
        needs_relaunch("mpi", {})
    assert child_env(2, {})[CHILD_ENV] == "1"


def test_child_args_pin_one_run_dir():
    args = child_args(["stage=pretrain", "run_dir=rel/x", "launcher=deepspeed"], run_dir="/abs/x")
    assert args == ["stage=pretrain", "launcher=deepspeed", "run_dir=/abs/x"]


def test_the_launcher_removes_its_runs_deepspeed_shared_memory(tmp_path):
    from alignlab.launch import remove_shm_buffers

    names = [
        "deepspeed_allreduce_buffer_0_127.0.0.1_29500_0",  # this run (uid 0, port 29500), both ranks
        "deepspeed_allreduce_buffer_0_127.0.0.1_29500_1",
        "deepspeed_allreduce_buffer_0_node-1_29500_0",  # another address, the same port: a SLURM-style host name
        "deepspeed_allreduce_buffer_0_127.0.0.1_295001_0",  # another run whose port starts with the same digits
        "deepspeed_allreduce_buffer_0_127.0.0.1_2950_0",
        "deepspeed_allreduce_buffer_1000_127.0.0.1_29500_0",  # another user's
        "torch_shm_29500",  # not DeepSpeed's
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    removed = remove_shm_buffers(29500, shm_dir=tmp_path, uid=0)
    assert sorted(p.name for p in removed) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])
    assert remove_shm_buffers(29500, shm_dir=tmp_path / "absent", uid=0) == []


def test_leftovers_that_slow_or_hang_a_launch_are_found(tmp_path):
    import os
    import time

    from alignlab.launch import stale_build_locks, stale_shm_buffers

    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    for n in ("deepspeed_allreduce_buffer_0_127.0.0.1_1234_0", "deepspeed_allreduce_buffer_0_127.0.0.1_1234_1",
              "deepspeed_allreduce_buffer_0_127.0.0.1_999_0", "deepspeed_allreduce_buffer_7_127.0.0.1_999_0"):  # fmt: skip
        (shm / n).write_bytes(b"x")
    # a live run (pid 42) maps both of port 1234's buffers; nothing maps port 999's
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "maps").write_text(
        f"7f00-7f10 rw-s 00000000 00:1a 12 {shm}/deepspeed_allreduce_buffer_0_127.0.0.1_1234_0\n"
        f"7f10-7f20 rw-s 00000000 00:1a 13 {shm}/deepspeed_allreduce_buffer_0_127.0.0.1_1234_1 (deleted)\n"
        "7f20-7f30 r-xp 00000000 00:1a 14 /usr/lib/libc.so.6\n"
    )
    (proc / "self").mkdir()  # not a pid
    assert [p.name for p in stale_shm_buffers(shm, proc, uid=0)] == [
        "deepspeed_allreduce_buffer_0_127.0.0.1_999_0"
    ]

    ext = tmp_path / "torch_extensions"
    (ext / "py311_cpu" / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "py311_cpu" / "fused_adam").mkdir()
    old, fresh = ext / "py311_cpu" / "deepspeed_shm_comm" / "lock", ext / "py311_cpu" / "fused_adam" / "lock"
    old.write_text(""), fresh.write_text("")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert stale_build_locks(ext) == [old]  # a build running now holds a fresh lock: not reported
    assert stale_build_locks(tmp_path / "none") == []
