"""Kill tests: a training stage stopped by SIGTERM checkpoints and exits 75 (the sbatch templates requeue on it);
resume=auto then ends exactly where an uninterrupted run ends. A checkpoint damaged on disk is skipped for the
previous one. Runs are compared on the same machine and thread count, so CPU results match bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignlab.checkpoint import MANIFEST, PREEMPTED_EXIT
from tests.conftest import alignlab, run_env, run_stage

pytestmark = pytest.mark.slow


def comparable(run_dir: Path, skip: tuple[str, ...] = ()) -> dict[tuple[int, str], list]:
    """(step, metric) -> its values in order over metrics.jsonl, without wall-clock metrics (a row logged twice by
    a resumed run shows as one value too many)."""
    out: dict[tuple[int, str], list] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key in ("step", "time") or key.startswith(("perf/", "time/")) or key.startswith(skip):
                continue
            out.setdefault((row["step"], key), []).append(value)
    return out


def terminate_at(overrides: list[str], run_dir: Path, step: int, cwd: Path) -> subprocess.CompletedProcess:
    """Start the stage, send SIGTERM once metrics.jsonl has a row at `step` or later, and wait for it to exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignlab", *overrides],
        cwd=cwd,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        rows = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(r)["step"] >= step for r in rows if r.endswith("}")):
            os.kill(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def compute_of(run_dir: Path) -> dict:
    """compute.json's FLOPs and tokens by part (alignlab/compute.py); its inputs name the run's own paths."""
    record = json.loads((run_dir / "compute.json").read_text())
    assert record["flops"] > 0
    return {k: record[k] for k in ("parts", "tokens")}


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))


def assert_preempted(proc: subprocess.CompletedProcess, run_dir: Path, after: int) -> int:
    """Exit 75, no done.json, a committed checkpoint at or after `after`; returns its step."""
    assert proc.returncode == PREEMPTED_EXIT, proc.stderr[-3000:]
    assert "preempted (SIGTERM: checkpointed step" in proc.stderr
    assert not (run_dir / "done.json").exists()
    newest = checkpoints(run_dir)[-1]
    assert newest >= after and (run_dir / "checkpoints" / f"checkpoint-{newest}" / MANIFEST).exists()
    return newest


def test_pretrain_killed_and_resumed_matches_the_uninterrupted_run(tmp_path, data_cache):
    common = [
        "stage=pretrain",
        "experiment=quick",
        "stage.steps=40",
        "stage.batch_size=16",
        "stage.micro_batch_size=8",  # 2 accumulation steps: their running loss is part of the state too
        "stage.eval_every=20",
        "stage.sample_eval=0",
        "stage.checkpoint_every=15",
        f"paths.runs={tmp_path / 'runs'}",
        f"paths.data={data_cache}",
    ]
    whole, cut = (tmp_path / "runs" / "quick" / n for n in ("whole", "cut"))
    alignlab(*common, "stage.name=whole", cwd=tmp_path)

    stopped = terminate_at([*common, "stage.name=cut"], cut, 20, tmp_path)
    step = assert_preempted(stopped, cut, 20)
    assert step < 40, "the run finished before the signal arrived"

    resumed = alignlab(*common, "stage.name=cut", "resume=auto", cwd=tmp_path)
    assert f"continuing from {cut / 'checkpoints' / f'checkpoint-{step}'} (step {step})" in resumed.stderr
    # Loss, learning rate, gradient norm and evaluations at every logged step: bitwise those of the whole run.
    assert comparable(cut) == comparable(whole)
    assert (cut / "done.json").exists() and checkpoints(cut) == [30, 40]  # keep_checkpoints=2


def test_ppo_killed_with_a_truncated_checkpoint_resumes_from_the_previous_one(
    tinyhh_rm, tinyhh_root, data_cache
):
    common = [
        "stage=ppo",
        "stage.iterations=6",
        "stage.rollout_batch_size=32",
        "stage.minibatch_size=16",
        "stage.micro_batch_size=8",
        "stage.eval_prompts=16",
        "stage.eval_every=3",
        "stage.sample_eval=0",
        "stage.samples_every=2",
        "stage.checkpoint_every=2",
        "stage.kl_controller=adaptive",  # its beta moves every iteration: part of the checkpointed state
        "keep_checkpoints=3",
    ]
    runs = tinyhh_root / "runs" / "tinyhh"
    whole, cut = runs / "ppo_whole", runs / "ppo_cut"
    run_stage(tinyhh_root, data_cache, *common, "stage.name=ppo_whole")

    overrides = [
        *common,
        "stage.name=ppo_cut",
        f"paths.runs={tinyhh_root / 'runs'}",
        f"paths.data={data_cache}",
    ]
    stopped = terminate_at(overrides, cut, 3, tinyhh_root)
    newest = assert_preempted(stopped, cut, 3)
    assert newest < 6, "the run finished before the signal arrived"

    # The newest checkpoint loses the end of its actor weights on disk: resume=auto names it and takes the one before.
    weights = next((cut / "checkpoints" / f"checkpoint-{newest}" / "actor").glob("*model_states.pt"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    previous = checkpoints(cut)[-2]
    resumed = run_stage(tinyhh_root, data_cache, *common, "stage.name=ppo_cut", "resume=auto")
    assert f"checkpoint-{newest} is unusable" in resumed.stderr and "truncated" in resumed.stderr
    assert (
        f"continuing from {cut / 'checkpoints' / f'checkpoint-{previous}'} (step {previous})"
        in resumed.stderr
    )

    # RM score, KL, beta, losses and held-out evaluations at every iteration match the uninterrupted run.
    assert comparable(cut) == comparable(whole)
    rows = lambda d: [json.loads(r) for r in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(cut) == rows(whole)  # the sample tables, too: no iteration twice, none missing
    assert compute_of(cut) == compute_of(whole)  # the checkpoint carries the compute count on


def test_sft_killed_and_resumed_through_the_trainer(tinyhh_root, data_cache):
    common = [
        "stage=sft",
        "stage.steps=30",
        "stage.eval_every=10",
        "stage.checkpoint_every=10",
        "stage.sample_eval=0",
    ]
    runs = tinyhh_root / "runs" / "tinyhh"
    whole, cut = runs / "sft_whole", runs / "sft_cut"
    run_stage(tinyhh_root, data_cache, *common, "stage.name=sft_whole")

    overrides = [
        *common,
        "stage.name=sft_cut",
        f"paths.runs={tinyhh_root / 'runs'}",
        f"paths.data={data_cache}",
    ]
    stopped = terminate_at(overrides, cut, 12, tinyhh_root)
    step = assert_preempted(stopped, cut, 12)
    assert step < 30, "the run finished before the signal arrived"

    resumed = run_stage(tinyhh_root, data_cache, *common, "stage.name=sft_cut", "resume=auto")
    assert f"(step {step})" in resumed.stderr
    # The held-out answer loss before, during and after training is bitwise the uninterrupted run's. The Trainer's
    # running train/* averages restart at the checkpoint, so the first log line after it averages fewer steps.
    assert comparable(cut, skip=("train/",)) == comparable(whole, skip=("train/",))
    before = {k: v for k, v in comparable(cut).items() if k[0] <= step}
    assert before == {k: v for k, v in comparable(whole).items() if k[0] <= step}
    assert (cut / "model" / "model.safetensors").read_bytes() == (
        whole / "model" / "model.safetensors"
    ).read_bytes()
    assert compute_of(cut) == compute_of(whole)  # the Trainer's token count is in its checkpointed state


def test_dpo_killed_and_resumed_ends_as_the_uninterrupted_run(tinyhh_sft, tinyhh_root, data_cache):
    common = [
        "stage=dpo",
        "stage.steps=12",
        "stage.log_every=2",
        "stage.eval_every=6",
        "stage.checkpoint_every=4",
        "stage.eval_rows=32",
        "stage.sample_eval=0",
    ]
    runs = tinyhh_root / "runs" / "tinyhh"
    whole, cut = runs / "dpo_whole", runs / "dpo_cut"
    run_stage(tinyhh_root, data_cache, *common, "stage.name=dpo_whole")
    overrides = [
        *common,
        "stage.name=dpo_cut",
        f"paths.runs={tinyhh_root / 'runs'}",
        f"paths.data={data_cache}",
    ]
    stopped = terminate_at(overrides, cut, 4, tinyhh_root)
    step = assert_preempted(stopped, cut, 4)
    assert step < 12, "the run finished before the signal arrived"
    resumed = run_stage(tinyhh_root, data_cache, *common, "stage.name=dpo_cut", "resume=auto")
    assert f"(step {step})" in resumed.stderr
    # held-out metrics (the implicit reward's accuracy and margin) and the final policy: the uninterrupted run's
    assert comparable(cut, skip=("train/",)) == comparable(whole, skip=("train/",))
    assert (cut / "model" / "model.safetensors").read_bytes() == (
        whole / "model" / "model.safetensors"
    ).read_bytes()
    assert compute_of(cut) == compute_of(whole)


def test_resume_with_another_world_size_is_a_clear_error(tmp_path, data_cache):
    """The ZeRO shards and each rank's RNG belong to the saved layout: refuse instead of a silently different run."""
    from omegaconf import OmegaConf

    from alignlab.checkpoint import write_manifest
    from alignlab.lifecycle import newest_checkpoint as find_resume

    path = tmp_path / "run" / "checkpoints" / "checkpoint-5"
    path.mkdir(parents=True)
    cfg = OmegaConf.create(
        {"resume": "auto", "run_dir": str(tmp_path / "run"), "stage": {"name": "sft", "lr": 1.0}}
    )
    resolved = OmegaConf.to_container(cfg)
    write_manifest(path, 5, config=resolved, world_size=2)
    with pytest.raises(ValueError, match="saved by 2 ranks, this run has 1"):
        find_resume(cfg, resolved, world_size=1)
    assert find_resume(cfg, resolved, world_size=2) == (5, path)
    changed = OmegaConf.merge(cfg, {"stage": {"lr": 2.0}})
    assert (
        find_resume(changed, OmegaConf.to_container(changed), world_size=2) is None
    )  # another config: fresh
    with pytest.raises(ValueError, match="resume='sometimes'"):
        find_resume(OmegaConf.merge(cfg, {"resume": "sometimes"}), resolved, world_size=1)
