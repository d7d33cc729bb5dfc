"""logger=wandb on real stages, offline because no API key is set: the offline run directory read back holds the
resolved config, the run's grouping, every metric of metrics.jsonl at its step, and eval's plots and samples."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignlab.tracking import offline_attempts, read_metrics, read_wandb_offline
from tests.conftest import run_env

pytestmark = pytest.mark.slow

# a short pretraining run: metrics at several steps, two rows at some steps (train and eval), the data/ row at 0
PRETRAIN = "stage=pretrain experiment=quick stage.steps=20 stage.warmup_steps=2 stage.log_every=5 stage.eval_every=10"
PRETRAIN += (
    " stage.eval_batches=1 stage.sample_eval=0 stage.batch_size=8 stage.micro_batch_size=8 stage.seq_len=128"
)


def run_without_api_key(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in run_env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    proc = subprocess.run(
        [sys.executable, "-m", "alignlab", "logger=wandb", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def by_step(rows: list[dict]) -> dict[int, dict]:
    """metrics.jsonl rows merged per step, the way W&B commits several log calls at one step as one row."""
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in ("step", "time")})
    return out


def sync_hint(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    return [lines[i + 1].strip() for i, line in enumerate(lines[:-1]) if "Upload it with:" in line]


def test_pretrain_offline_run_holds_the_config_and_every_metric(tmp_path, data_cache):
    proc = run_without_api_key(
        *PRETRAIN.split(), f"paths.runs={tmp_path / 'runs'}", f"paths.data={data_cache}", cwd=tmp_path
    )
    run_dir = tmp_path / "runs" / "quick" / "pretrain"
    run = read_wandb_offline(run_dir)

    assert (run.project, run.group, run.job_type, run.name) == (
        "alignlab",
        "quick",
        "pretrain",
        "quick/pretrain",
    )
    assert run.config == yaml.safe_load(
        (run_dir / "config.yaml").read_text()
    )  # the resolved config, all of it
    assert run.config["stage"]["steps"] == 20 and run.config["seed"] == 0 and run.config["model"]["arch"]

    jsonl = by_step(read_metrics(run_dir))
    assert [r["step"] for r in run.history] == list(jsonl) == [0, 5, 10, 15, 20]
    for row in run.history:
        assert {k: v for k, v in row.items() if k != "step"} == jsonl[row["step"]]
    assert {"train/loss", "eval/loss", "perf/tokens_per_s"} <= run.history[2].keys()  # namespaced keys
    assert run.summary["eval/loss"] == jsonl[20]["eval/loss"]

    (attempt,) = offline_attempts(run_dir / "wandb", run.id)
    assert sync_hint(proc.stderr) == [f"wandb sync {attempt}"] * 2  # at the start and at the end


def tinyhh_answers(tmp_path: Path) -> list[str]:
    """A prompts file and two answers files (a safe and an unsafe system) on TinyHH eval phrasings."""
    from alignlab.tinyhh import world
    from alignlab.tinyhh.emitters import dialogue

    rng = random.Random(0)
    files = {"prompts": [], "safe": [], "unsafe": []}
    for name, topics, attack in (
        ("benign", world.BENIGN_TOPICS, None),
        ("harmful", world.HARMFUL_TOPICS, None),
        ("attack", world.HARMFUL_TOPICS, world.ATTACK_SUFFIXES[0]),
    ):
        for i, topic in enumerate(topics[:6]):
            q = world.render_prompt(world.EVAL_TEMPLATES[i % len(world.EVAL_TEMPLATES)], topic, attack)
            row = {"set": name, "prompt": dialogue([(q, "")], open_answer=True)}
            safe, unsafe = ("helpful", "unhelpful") if name == "benign" else ("refusal", "harmful")
            files["prompts"].append(row)
            files["safe"].append({**row, "answer": world.render_response(safe, topic, rng)})
            files["unsafe"].append({**row, "answer": world.render_response(unsafe, topic, rng)})
    for name, rows in files.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = [f"stage.prompts={tmp_path / 'prompts.jsonl'}", "stage.baseline=safe", "stage.ptx_blocks=0"]
    for system in ("safe", "unsafe"):
        out += [f"+stage.systems.{system}.answers={tmp_path / system}.jsonl"]
        out += [f"+stage.systems.{system}.answers_field=answer"]
    return out


def test_eval_plots_and_samples_land_in_the_offline_run(tmp_path):
    # answers files only: no model, no data generation (the other default systems are missing and skipped)
    run_without_api_key(
        "stage=eval", *tinyhh_answers(tmp_path), f"paths.runs={tmp_path / 'runs'}", cwd=tmp_path
    )
    run_dir = tmp_path / "runs" / "tinyhh" / "eval"
    run = read_wandb_offline(run_dir)
    (attempt,) = offline_attempts(run_dir / "wandb", run.id)
    assert (run.group, run.job_type) == ("tinyhh", "eval")

    (row,) = run.history  # eval logs everything at step 0
    assert row["eval/safe/harmlessness"] == 1.0 and row["eval/unsafe/attack_success"] == 1.0
    for plot in ("rates", "tradeoff", "win_rates"):
        ref = row[f"eval/{plot}"]
        assert ref["_type"] == "image-file" and ref["path"].startswith("media/images/eval/")
        assert (attempt / "files" / ref["path"]).read_bytes() == (run_dir / f"{plot}.png").read_bytes()
    table = json.loads((attempt / "files" / row["eval/samples"]["path"]).read_text())
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").open()]
    assert table["columns"] == list(samples[0]) and len(table["data"]) == len(samples) == 36
