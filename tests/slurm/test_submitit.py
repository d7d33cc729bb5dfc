"""Hydra sweeps through hydra-submitit-launcher (cluster=cpu) on a real local slurmctld: one job per point,
and submitit's requeue of a checkpointed job that then resumes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from alignlab.tracking import read_metrics
from tests.slurm.test_sbatch import TINY, last_step

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def test_sweep_runs_one_two_rank_job_per_point(slurm_cluster, tmp_path, quick_data):
    cmd = [
        sys.executable, "-m", "alignlab", "-m", "cluster=cpu", *TINY,
        f"paths.runs={tmp_path / 'runs'}", f"paths.data={quick_data}", "stage.lr=1e-3,3e-3",
    ]  # fmt: skip
    try:
        # the launcher submits a job array and waits for both results
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=slurm_cluster.env, capture_output=True, text=True, timeout=400
        )
    except subprocess.TimeoutExpired as e:
        logs = "\n".join(
            f"--- {f}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(tmp_path.rglob("*_log.*"))
        )
        pytest.fail(f"sweep not finished in {e.timeout}s:\n{slurm_cluster.run('squeue').stdout}\n{logs}")
    assert proc.returncode == 0, proc.stderr[-6000:]

    (sweep,) = (tmp_path / "runs" / "quick" / "multirun").iterdir()
    lrs = {}
    for num in ("0", "1"):  # each point its own run directory: <sweep dir>/<job number>
        run = sweep / num
        assert {"config.yaml", "metrics.jsonl", "model", "done.json"} <= {p.name for p in run.iterdir()}, num
        config = OmegaConf.load(run / "config.yaml")
        assert config.run_dir == str(run) and config.resume == "auto" and config.launcher.name == "local"
        lrs[num] = config.stage.lr
    assert sorted(lrs.values()) == [1e-3, 3e-3]

    # every job was one srun step of 2 tasks (tasks_per_node=2), each task a rank of the same process group
    for job_dir in sorted((sweep / ".submitit").glob("*_[01]")):
        rank_logs = {f.name.split("_")[2] for f in job_dir.glob("*_log.err")}
        assert rank_logs == {"0", "1"}, job_dir
        assert len(list(job_dir.glob("*_result.pkl"))) == 2, job_dir  # both tasks finished their function
        rank0 = next(job_dir.glob("*_0_log.err")).read_text()
        assert "world_size=2" in rank0 and "4 micro x 1 accum x 2 ranks" in rank0, rank0[-3000:]


def test_usr2_checkpoints_and_submitit_requeues_and_resumes(slurm_cluster, tmp_path, quick_data):
    steps = 60
    cmd = [
        sys.executable, "-m", "alignlab", "-m", "cluster=cpu", *TINY, f"stage.steps={steps}",
        "stage.eval_every=0", "stage.checkpoint_every=20", f"paths.runs={tmp_path / 'runs'}",
        f"paths.data={quick_data}",  # no a,b list: a sweep of one point
    ]  # fmt: skip
    out_file = tmp_path / "submitter.log"  # a file, not a pipe: nobody reads a pipe while we poll
    with open(out_file, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=slurm_cluster.env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            metrics = list((tmp_path / "runs").glob("quick/multirun/*/0/metrics.jsonl"))
            if metrics and last_step(metrics[0].parent) >= 10:
                break
            assert proc.poll() is None, out_file.read_text()[-4000:]
            time.sleep(0.5)
        else:
            pytest.fail(
                f"the sweep's job logged no step >= 10 in 240 s:\n{slurm_cluster.run('squeue').stdout}"
            )
        # what submitit's --signal=USR2@<signal_delay_s> does before a time limit
        job_id = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()[0]
        slurm_cluster.run("scancel", "--signal=USR2", job_id)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out_file.read_text()[-6000:]

    (run,) = (tmp_path / "runs").glob("quick/multirun/*/0")
    assert slurm_cluster.job(job_id).restarts == 1
    (rank0,) = run.parent.glob(f".submitit/{job_id}/{job_id}_0_log.err")
    log = rank0.read_text()
    assert "Requeued job" in log and "resume=auto: continuing from" in log, log[-6000:]
    assert (run / "done.json").exists()
    logged = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert logged == list(range(10, steps + 1, 10)), logged
