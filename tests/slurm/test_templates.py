"""slurm/run_stage.sh's decisions with stand-in srun/scontrol, and the +cluster presets (no SLURM needed: fast).

The real-cluster tests (test_sbatch.py, test_submitit.py) show the happy paths end to end; these pin down the
branches a local cluster cannot reach cheaply: requeue limits, cancellation, bad arguments, the rendezvous.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from alignlab.checkpoint import PREEMPTED_EXIT
from alignlab.config import register_configs
from tests.conftest import ROOT, alignlab

register_configs()
RUN_STAGE = ROOT / "slurm" / "run_stage.sh"
CLUSTER_PRESETS = sorted(p.stem for p in (ROOT / "conf" / "cluster").glob("*.yaml"))

# srun stand-in: records its arguments and rendezvous variables, then exits $FAKE_SRUN_RC; with FAKE_SRUN_TERM=1
# it first sends SIGTERM to the batch script, as scancel / preemption do.
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
echo "$MASTER_ADDR $MASTER_PORT $OMP_NUM_THREADS ${RANK:-unset}" > "$FAKE_LOG/srun.env"
[ "${FAKE_SRUN_TERM:-0}" = 1 ] && kill -TERM $PPID && sleep 0.2
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
case $1 in
    show) echo node7; echo node8 ;;  # show hostnames <list>
    requeue) echo "$2" >> "$FAKE_LOG/requeued" ;;
esac
"""


@pytest.fixture()
def run_script(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def go(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "ALIGNLAB_"))}
        base.pop("OMP_NUM_THREADS", None)
        base.update(
            PATH=f"{bin_dir}{os.pathsep}{base['PATH']}",
            FAKE_LOG=str(tmp_path),
            SLURM_JOB_ID="1234",
            SLURM_SUBMIT_DIR=str(ROOT),
            SLURM_JOB_NODELIST="node[7-8]",
            SLURM_NTASKS="4",
            SLURM_CPUS_PER_TASK="3",
        )
        base.update(env)
        base = {k: v for k, v in base.items() if v is not None}
        proc = subprocess.run(
            ["bash", str(RUN_STAGE), *args], env=base, capture_output=True, text=True, timeout=30
        )
        return proc, tmp_path

    return go


def srun_args(log: Path) -> list[str]:
    return (log / "srun.args").read_text().splitlines()


def test_runs_every_rank_with_resume_auto_and_launcher_local(run_script):
    proc, log = run_script("stage=ppo", "stage.kl_coef=0.02")
    assert proc.returncode == 0, proc.stderr
    python = (
        str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else "python"
    )
    assert srun_args(log) == [
        "--cpus-per-task=3",  # srun (22.05+) does not inherit it from sbatch
        python,
        "-m",
        "alignlab",
        "resume=auto",
        "stage=ppo",
        "stage.kl_coef=0.02",
        "launcher=local",
    ]
    # rank 0's node hosts the rendezvous, on the port distributed.env_from would pick for this job
    assert (log / "srun.env").read_text().split() == ["node7", str(20000 + 1234 % 20000), "3", "unset"]
    assert not (log / "requeued").exists()


def test_rank_variables_of_the_submitting_shell_do_not_leak_into_the_job(run_script):
    # torchrun-style RANK/WORLD_SIZE would win over SLURM_PROCID in distributed.env_from: every task rank 3
    proc, log = run_script("stage=rm", RANK="3", WORLD_SIZE="8", MASTER_ADDR="laptop", MASTER_PORT="1")
    assert proc.returncode == 0, proc.stderr
    assert (log / "srun.env").read_text().split() == ["node7", "21234", "3", "unset"]
    proc, log = run_script("stage=rm", ALIGNLAB_MASTER_PORT="29999")
    assert (log / "srun.env").read_text().split()[:2] == ["node7", "29999"]


def test_overrides_pass_through_and_the_users_resume_wins(run_script):
    proc, log = run_script(
        "stage=sft", "resume=never", "model.lora.enabled=true", ALIGNLAB_PYTHON="/bin/true"
    )
    assert proc.returncode == 0, proc.stderr
    args = srun_args(log)
    assert args[0] == "--cpus-per-task=3" and args[1] == "/bin/true"
    assert args[4:] == [
        "resume=auto",
        "stage=sft",
        "resume=never",
        "model.lora.enabled=true",
        "launcher=local",
    ]


def test_the_template_requeues_on_the_stages_preempted_exit_code():
    assert f"\nPREEMPTED_EXIT={PREEMPTED_EXIT}\n" in RUN_STAGE.read_text()


def test_checkpointed_stage_is_requeued(run_script):
    proc, log = run_script("stage=pretrain", FAKE_SRUN_RC=str(PREEMPTED_EXIT), SLURM_RESTART_COUNT="2")
    assert proc.returncode == PREEMPTED_EXIT
    assert (log / "requeued").read_text().split() == ["1234"]
    assert "requeueing job 1234" in proc.stdout and "restart 2 on node[7-8]" in proc.stdout


def test_requeues_stop_at_the_limit(run_script):
    proc, log = run_script(
        "stage=pretrain", FAKE_SRUN_RC="75", SLURM_RESTART_COUNT="3", ALIGNLAB_MAX_REQUEUES="3"
    )
    assert proc.returncode == 75 and not (log / "requeued").exists()
    assert "3 restarts reached ALIGNLAB_MAX_REQUEUES=3" in proc.stderr


def test_cancelled_job_is_not_requeued(run_script):
    # scancel: SIGTERM to the script and the ranks; the ranks checkpoint and exit 75, the job must stay cancelled
    proc, log = run_script("stage=pretrain", FAKE_SRUN_RC="75", FAKE_SRUN_TERM="1")
    assert proc.returncode == 75 and not (log / "requeued").exists(), proc.stdout + proc.stderr
    assert "not requeueing" in proc.stdout


@pytest.mark.parametrize("rc", [1, 137])
def test_failures_are_not_requeued_and_keep_their_exit_code(run_script, rc):
    proc, log = run_script("stage=pretrain", FAKE_SRUN_RC=str(rc))
    assert proc.returncode == rc and not (log / "requeued").exists()


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["launcher=deepspeed"], {}, "launcher=deepspeed: the SLURM templates run launcher=local"),
        (["-m", "stage.lr=1,2"], {}, "a sweep is submitted with hydra/launcher=submitit_slurm"),
        (["stage=pipeline"], {}, "stage=pipeline runs its stages itself"),
        (["stage=rm"], {"SLURM_JOB_ID": None}, "not inside a SLURM job"),
        (["stage=rm"], {"SLURM_SUBMIT_DIR": "/"}, "/ is not the alignlab repository"),
        (["stage=rm"], {"ALIGNLAB_PYTHON": "/no/such/python"}, "ALIGNLAB_PYTHON=/no/such/python is not"),
    ],
)
def test_bad_invocations_fail_before_srun_with_the_fix(run_script, args, env, message):
    proc, log = run_script(*args, **env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (log / "srun.args").exists()


def test_pipeline_on_one_task_is_allowed(run_script):
    proc, log = run_script("stage=pipeline", SLURM_NTASKS="1")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("template", ["single_node.sbatch", "multi_node.sbatch"])
def test_sbatch_templates_hand_over_to_run_stage(template, tmp_path):
    text = (ROOT / "slurm" / template).read_text()
    for directive in ("--requeue", "--signal=USR1@", "--open-mode=append", "--output=slurm-logs/%x-%j.out"):
        assert f"#SBATCH {directive}" in text, directive
    assert (ROOT / "slurm-logs").is_dir()  # SLURM does not create the --output directory
    # sbatch runs a spool copy of the file: it must find run_stage.sh through the submit directory
    env = {"PATH": os.environ["PATH"], "SLURM_SUBMIT_DIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / template), "stage=rm"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "submit from the repository root or export ALIGNLAB_ROOT" in proc.stderr


def test_scripts_parse():
    for f in (RUN_STAGE, ROOT / "slurm" / "single_node.sbatch", ROOT / "slurm" / "multi_node.sbatch"):
        proc = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert proc.returncode == 0, (f, proc.stderr)


# ------------------------------------------------------------------------------------------ cluster presets


def compose_preset(preset: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=["stage=rm", f"cluster={preset}", *overrides],
            return_hydra_config=True,
        )


@pytest.mark.parametrize("preset", CLUSTER_PRESETS)
def test_cluster_presets_make_a_resumable_sweep_of_local_ranks(preset):
    cfg = compose_preset(preset)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.launcher.name == "local" and cfg.resume == "auto"
    # each sweep point its own directory (the default runs/<experiment>/<stage> would be shared by all)
    run_dir = OmegaConf.to_container(cfg, resolve=False)["run_dir"]
    assert run_dir.startswith(
        "${alignlab_run_dir:"
    )  # a sweep job's own <sweep.dir>/<sweep.subdir> (test_compose)
    assert launcher.signal_delay_s < launcher.timeout_min * 60 and launcher.max_num_timeout > 0
    if launcher.gpus_per_node:
        assert launcher.tasks_per_node == launcher.gpus_per_node  # one rank per GPU


def test_gpu_presets_override_only_what_differs():
    one, two = compose_preset("gpu_1node").hydra.launcher, compose_preset("gpu_2nodes").hydra.launcher
    assert (one.nodes, two.nodes) == (1, 2) and two.gpus_per_node == one.gpus_per_node == 8
    assert compose_preset("cpu").hydra.launcher.gpus_per_node is None
    assert compose_preset("gpu_1node", "hydra.launcher.partition=a100").hydra.launcher.partition == "a100"


def test_help_lists_the_cluster_presets(tmp_path):
    out = alignlab("--help", cwd=tmp_path).stdout
    assert "cluster: " + ", ".join(CLUSTER_PRESETS) in out
    assert "cluster=" in out and "slurm/single_node.sbatch" in out


def test_signals_reach_the_stage_handlers():
    # the templates' --signal=USR1 and submitit's SIGUSR2 must be ones the training stages checkpoint on
    from alignlab.checkpoint import SIGNALS

    assert {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM} <= set(SIGNALS)
