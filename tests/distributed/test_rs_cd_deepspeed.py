"""stage=rejection_sampling and stage=context_distillation on 2 CPU processes under the DeepSpeed launcher: each
rank samples its share of the prompts, the gathered datasets are written once, and the SFT-loss fine-tuning runs
on the shared DeepSpeed engine (rejection sampling under ZeRO-3, which also checks that the next iteration's
sampler loads as a plain model after a ZeRO-3 trainer)."""

from __future__ import annotations

import pytest

from alignlab.data.loading import load_rows
from alignlab.tracking import read_metrics
from tests.conftest import alignlab

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def run_two(root, data_cache, out, zero, *overrides):
    return alignlab(
        *overrides,
        "launcher=deepspeed",
        "launcher.nproc=2",
        f"deepspeed={zero}",
        f"paths.runs={root / 'runs'}",
        f"paths.data={data_cache}",
        f"run_dir={out}",
        cwd=out.parent,
        timeout=900,
    )


def test_rejection_sampling_two_processes_zero3(tinyhh_rm, tinyhh_root, data_cache, tmp_path):
    out = tmp_path / "rs"
    proc = run_two(
        tinyhh_root,
        data_cache,
        out,
        "zero3",
        "stage=rejection_sampling",
        "stage.iterations=2",
        "stage.prompts_per_iteration=24",
        "stage.samples_per_prompt=4",
        "stage.eval_prompts=16",
        "stage.sample_eval=0",
        "stage.finetune.epochs=1",
        "stage.finetune.batch_size=8",
        "stage.finetune.micro_batch_size=4",
    )
    assert "world_size=2" in proc.stderr
    for it in (1, 2):
        pool = load_rows(str(out / f"iteration_{it}" / "pool.jsonl")).to_list()
        assert len(pool) == 24 and all(len(r["responses"]) == 4 for r in pool)  # both ranks' halves
    rows = read_metrics(out)
    assert len([r for r in rows if "eval/rm_score" in r]) == 3  # start + one per iteration, logged once
    assert len(list((out / "iteration_2" / "checkpoints").rglob("*optim_states.pt"))) == 2  # a shard per rank
    assert (out / "model" / "model.safetensors").exists()


def test_context_distillation_two_processes_zero2(tinyhh_rm, tinyhh_root, data_cache, tmp_path):
    out = tmp_path / "cd"
    proc = run_two(
        tinyhh_root,
        data_cache,
        out,
        "zero2",
        "stage=context_distillation",
        "stage.n_prompts=48",
        "stage.sample_eval=0",
        "stage.finetune.epochs=1",
        "stage.finetune.batch_size=8",
        "stage.finetune.micro_batch_size=4",
    )
    assert "world_size=2" in proc.stderr
    candidates = load_rows(str(out / "distill.jsonl")).to_list()
    assert len(candidates) == 48 and len({c["prompt"] for c in candidates}) > 1
    kept = [c for c in candidates if c["kept"]]
    assert len(load_rows(str(out / "train.jsonl"))) == len(kept) > 0
    assert (out / "model" / "model.safetensors").exists()
