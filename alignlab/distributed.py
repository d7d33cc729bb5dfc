"""Process-group set-up from torchrun / DeepSpeed / SLURM variables, DeepSpeed engine wrapping, rank-0 helpers."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from alignlab.errors import ConfigError

ZERO_STAGES = (0, 1, 2, 3)  # deepspeed.zero_stage


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port nobody listens on right now (for single-process rendezvous and relaunches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list: "gpu[01-03,07],login1" -> ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"(.*?)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)  # keep zero padding: gpu[01-03]
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return hosts


def env_from(environ: dict[str, str]) -> DistEnv:
    """Rank layout from the launcher's variables: torchrun/DeepSpeed (RANK...), else an srun step, else one process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
        )
    # Only an srun step is a rank layout: the batch script itself also sees SLURM_NTASKS=N and SLURM_PROCID=0.
    if int(environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "localhost")
        # One port per job so two jobs sharing a node do not collide.
        port = int(environ.get("MASTER_PORT", 20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_STEP_NUM_TASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR", expand_nodelist(nodelist)[0]),
            master_port=port,
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(environ.get("MASTER_PORT", 0)) or free_port())


def init(environ: dict[str, str] | None = None) -> DistEnv:
    """Initialise torch.distributed (through DeepSpeed) for this process; world size 1 is a valid group."""
    environ = os.environ if environ is None else environ
    env = env_from(dict(environ))
    # DeepSpeed and torch read these; for SLURM and single-process runs we are the ones who set them.
    for key, value in {
        "RANK": env.rank,
        "WORLD_SIZE": env.world_size,
        "LOCAL_RANK": env.local_rank,
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": env.master_port,
    }.items():
        environ[key] = str(value)
    if torch.cuda.is_available():
        # Before the process group: NCCL binds to the current device. Modulo: under `srun --gpus-per-task=1`
        # every task sees one GPU, whatever its local rank.
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False
        )
    return env


def device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mean_over_ranks(value: float) -> float:
    """Average a Python float over all ranks (every rank gets the same answer)."""
    return means_over_ranks({"value": value})["value"]


def means_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average every value of a dict over all ranks in one collective (every rank gets the same answer)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    on = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist(), strict=True)}


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable obj, in rank order, on every rank (a list of one without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def grad_accum_steps(
    batch_size: int,
    micro_batch_size: int,
    world_size: int,
    names: tuple[str, str] = ("stage.batch_size", "stage.micro_batch_size"),
) -> int:
    """Gradient accumulation so that micro_batch_size * steps * world_size == batch_size, or a ConfigError naming
    the two keys (`names`: the config keys of batch_size and micro_batch_size, e.g. PPO's stage.minibatch_size)."""
    per_step = micro_batch_size * world_size
    if micro_batch_size < 1 or batch_size < 1 or batch_size % per_step:
        batch, micro = names
        raise ConfigError(
            f"{batch}={batch_size} must be a positive multiple of {micro}={micro_batch_size} x world size "
            f"{world_size} = {per_step}; change {batch} or {micro}"
        )
    return batch_size // per_step


def deepspeed_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    dtype: torch.dtype,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    overlap_comm: bool = False,
    reduce_bucket_size: int = 50_000_000,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for one engine (batch sizes derived here, once)."""
    if zero_stage not in ZERO_STAGES:
        raise ConfigError(f"deepspeed.zero_stage={zero_stage} is not a ZeRO stage; choose 0, 1, 2 or 3")
    if offload_param and zero_stage != 3:
        raise ConfigError("deepspeed.offload_param=true needs deepspeed.zero_stage=3")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage > 0:
        zero.update(
            overlap_comm=overlap_comm, reduce_bucket_size=reduce_bucket_size, contiguous_gradients=True
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_param:
        zero["offload_param"] = {"device": "cpu"}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # Our optimizers are plain torch AdamW, which ZeRO handles; DeepSpeed asks for this flag all the same.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    for key, value in (extra or {}).items():
        config[key] = value
    return config


def wrap(model: torch.nn.Module, optimizer, scheduler, config: dict[str, Any]):
    """A DeepSpeed engine around model + client optimizer/scheduler; the engine steps the scheduler."""
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine, optimizer, scheduler


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0, None elsewhere; collective under ZeRO-3, so call it on every rank."""
    if engine.zero_optimization_stage() != 3:
        return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if is_main() else None
    # DeepSpeed's own save path (save_16bit_model): gathers one module at a time and keeps the result on rank 0
    # only, so a save never needs the whole model resident on every GPU. Parameters keep their training dtype.
    state = engine._zero3_consolidated_16bit_state_dict()
    return state if is_main() else None
