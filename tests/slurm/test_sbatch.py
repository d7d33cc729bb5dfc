"""slurm/*.sbatch on a real local slurmctld: a 2-rank stage, and a signal that checkpoints, requeues and resumes."""

from __future__ import annotations

import json
import time

import pytest

from alignlab.tracking import read_metrics
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# The documented CPU-node invocation: no GPUs, 2 ranks of 1 core (the #SBATCH defaults ask for 8 GPUs).
CPU_NODE = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
# stage=pretrain experiment=quick cut to seconds; batch 8 = 4 per rank x 2 ranks.
TINY = [
    "stage=pretrain",
    "experiment=quick",
    "stage.steps=20",
    "stage.eval_every=10",
    "stage.eval_batches=2",
    "stage.batch_size=8",
    "stage.micro_batch_size=4",
    "stage.sample_eval=4",
    "stage.eval_max_new_tokens=16",
    "logger.progress=false",
]


def last_step(run_dir) -> int:
    """The highest step in run_dir/metrics.jsonl so far (-1 before the first row; a line being written is skipped)."""
    try:
        return max(r.get("step", 0) for r in read_metrics(run_dir))
    except (FileNotFoundError, ValueError):
        return -1


def wait_for_step(cluster, job_id: str, run, log, step: int, timeout: float = 240) -> None:
    """Wait until the job's run has logged `step` (training under way: the stage's signal handlers are in)."""
    deadline = time.time() + timeout
    while last_step(run) < step:
        if time.time() > deadline:
            pytest.fail(
                f"job {job_id} logged no step >= {step} in {timeout:.0f} s:\n{log.read_text()[-4000:]}"
            )
        assert cluster.job(job_id).state in ("PENDING", "RUNNING"), log.read_text()[-4000:]
        time.sleep(0.5)


def resumed_at(out: str) -> int:
    """The step the requeued run continued from, as the job log says."""
    return int(out.split("resume=auto: continuing from ")[1].split("(step ")[1].split(")")[0])


@pytest.fixture()
def submit(slurm_cluster, tmp_path, quick_data):
    """sbatch a template with the test's paths; returns (job id, its log file, the run directory)."""

    def go(template: str, *overrides: str):
        log = tmp_path / "job.out"
        job_id = slurm_cluster.sbatch(
            f"--output={log}",
            *CPU_NODE,
            str(ROOT / "slurm" / template),
            *overrides,
            f"paths.runs={tmp_path / 'runs'}",
            f"paths.data={quick_data}",
            cwd=ROOT,  # the templates find slurm/run_stage.sh through the submit directory
        )
        return job_id, log, tmp_path / "runs" / "quick" / "pretrain"

    return go


def test_templates_are_valid_sbatch_scripts(slurm_cluster):
    for template, extra in (("single_node.sbatch", []), ("multi_node.sbatch", ["--nodes=1"])):
        # --test-only: SLURM parses the #SBATCH lines and checks them against the cluster, starts nothing
        proc = slurm_cluster.run(
            "sbatch", "--test-only", *CPU_NODE, *extra, str(ROOT / "slurm" / template), cwd=ROOT, check=False
        )
        assert proc.returncode == 0 and "to start at" in proc.stderr, (template, proc.stderr)


def test_single_node_template_runs_a_stage_on_two_ranks(slurm_cluster, submit):
    job_id, log, run = submit("single_node.sbatch", *TINY)
    job = slurm_cluster.wait(job_id, timeout=300, log=log)
    out = log.read_text()
    assert job.state == "COMPLETED" and job.info["ExitCode"] == "0:0", out[-4000:]
    # one srun step of 2 tasks, each a rank of one process group
    assert "world_size=2" in out and "4 micro x 1 accum x 2 ranks" in out, out[-4000:]
    assert "resume=auto: no intact checkpoint" in out  # the template always resumes when it can

    assert {"config.yaml", "metrics.jsonl", "model", "done.json", "checkpoints"} <= {
        p.name for p in run.iterdir()
    }
    assert (run / "model" / "config.json").exists() and list((run / "model").glob("*.safetensors"))
    rows = read_metrics(run)
    keys = {k for r in rows for k in r} - {"step", "time"}
    assert keys and all("/" in k for k in keys), keys  # namespaced: train/loss, eval/loss, perf/...
    assert [r["step"] for r in rows if "train/loss" in r] == [10, 20]
    config = (run / "config.yaml").read_text()
    assert "resume: auto" in config and "name: local" in config
    done = json.loads((run / "done.json").read_text())
    assert done["stage"] == "pretrain" and done["config"]["stage"]["steps"] == 20


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, submit):
    steps = 60
    job_id, log, run = submit(
        "single_node.sbatch", *TINY, f"stage.steps={steps}", "stage.eval_every=0", "stage.checkpoint_every=20"
    )
    wait_for_step(slurm_cluster, job_id, run, log, 10)
    # what `--signal=USR1@<s>` does before a time limit: SIGUSR1 to every rank of the step
    slurm_cluster.run("scancel", "--signal=USR1", job_id)

    job = slurm_cluster.wait(job_id, timeout=300, log=log)
    out = log.read_text()
    assert job.state == "COMPLETED" and job.restarts == 1, (job.info, out[-6000:])
    assert "requeueing job" in out and "restart 1 on" in out, out[-6000:]
    assert 10 <= resumed_at(out) < steps, out[-6000:]
    assert (run / "done.json").exists() and (run / "model" / "config.json").exists()
    # one metrics row per logged step over both runs: nothing lost, nothing logged twice
    logged = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert logged == list(range(10, steps + 1, 10)), logged
