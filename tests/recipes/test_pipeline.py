"""stage=pipeline's failure paths, end to end (cheap: nothing trains). The full behaviour (skipping finished stages,
running the rest side by side, the report) is tests/science/test_pipeline_science.py."""

from __future__ import annotations

import json

from tests.conftest import run_stage


def test_a_bad_override_fails_before_any_stage_runs(tmp_path, data_cache):
    proc = run_stage(
        tmp_path, data_cache, "stage=pipeline", 'stage.overrides.ppo=["stage.kl_coeff=0.1"]', check=False
    )
    assert proc.returncode != 0
    assert "stage ppo of the pipeline does not compose" in proc.stderr and "kl_coeff" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "tinyhh").iterdir()) == ["pipeline"]
    proc = run_stage(tmp_path, data_cache, "stage=pipeline", "stage.stages=[sft,kto]", check=False)
    assert proc.returncode != 0 and "stage.stages='kto' is not one of: pretrain, sft," in proc.stderr


def test_a_failing_stage_stops_the_pipeline_and_names_its_log(tmp_path, data_cache):
    # rain's override composes; the stage itself then fails (its data is not there)
    proc = run_stage(
        tmp_path, data_cache, "stage=pipeline", "stage.stages=[rain,eval]",
        'stage.overrides.rain=["data.source=/nowhere/rows.jsonl"]', check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    log = tmp_path / "runs" / "tinyhh" / "pipeline" / "logs" / "rain.log"
    assert (
        f"stage rain failed; the last lines of {log}" in proc.stderr and "/nowhere/rows.jsonl" in proc.stderr
    )
    assert "data.source='/nowhere/rows.jsonl'" in log.read_text()
    status = json.loads((tmp_path / "runs" / "tinyhh" / "pipeline" / "pipeline.json").read_text())
    assert status["rain"]["state"] == "failed" and status["eval"]["state"] == "cancelled"
    assert (
        not (tmp_path / "runs" / "tinyhh" / "eval").exists()
        and not (tmp_path / "runs" / "tinyhh" / "rain" / "done.json").exists()
    )
