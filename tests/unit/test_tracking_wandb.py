"""W&B through Tracker, offline: what the run file holds (read back), media, resume, the `wandb sync` hint."""

from __future__ import annotations

import json
import logging
import struct

import pytest

from alignlab.tracking import (
    RUN_ID_FILE,
    Tracker,
    offline_attempts,
    read_metrics,
    read_wandb_offline,
    wandb_records,
)


@pytest.fixture(autouse=True)
def quiet_offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline because no key is set, the default path


def tracker(run_dir, **kw) -> Tracker:
    return Tracker(run_dir, is_main=True, backend="wandb", show_progress=False, **kw)


def by_step(rows: list[dict]) -> dict[int, dict]:
    """metrics.jsonl rows merged per step, the way W&B commits several log calls at one step as one row."""
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in ("step", "time")})
    return out


def test_offline_run_reads_back_identity_config_and_every_metric(tmp_path):
    # A config value longer than a 32 KiB block makes the run record span blocks (FIRST/MIDDLE/LAST chunks).
    config = {"stage": {"name": "ppo", "lr": 1e-5, "kl_coef": 0.02}, "seed": 7, "notes": "x" * 70_000}
    t = tracker(
        tmp_path,
        config=config,
        wandb_project="alignlab-test",
        wandb_group="quick",
        job_type="ppo",
        run_name="quick/ppo",
        wandb_tags=["t1"],
    )
    for step in range(1, 301):
        t.log({"ppo/kl": 0.001 * step, "ppo/clipfrac": 1 / step}, step=step)
        if step % 100 == 0:
            t.log({"eval/reward": step / 3, "eval/bad": float("inf")}, step=step)  # two calls at one step
    t.close()

    run = read_wandb_offline(tmp_path)
    assert run.id == (tmp_path / "wandb" / RUN_ID_FILE).read_text().strip()
    assert (run.project, run.group, run.job_type, run.name) == ("alignlab-test", "quick", "ppo", "quick/ppo")
    assert run.config == config
    assert run.files[0].stat().st_size > 2 * 32768  # the reader crossed block boundaries
    jsonl = by_step(read_metrics(tmp_path))
    assert [r["step"] for r in run.history] == list(jsonl) == list(range(1, 301))
    for row in run.history:
        assert {k: v for k, v in row.items() if k != "step"} == jsonl[row["step"]]
    assert run.history[99]["eval/bad"] == "inf" and run.history[299]["eval/reward"] == 100.0
    assert run.summary["ppo/kl"] == pytest.approx(0.3) and run.summary["eval/reward"] == 100.0


def test_run_file_reader_checks_the_checksum_and_stops_at_a_torn_tail(tmp_path):
    t = tracker(tmp_path)
    for step in range(50):
        t.log({"train/loss": float(step)}, step=step)
    t.close()
    file = read_wandb_offline(tmp_path).files[0]
    data = file.read_bytes()
    records = list(wandb_records(file))

    torn = tmp_path / "torn.wandb"  # a job killed mid-write: the records before the cut are read
    torn.write_bytes(data[: len(data) // 2])
    assert 0 < len(list(wandb_records(torn))) < len(records)

    corrupt = bytearray(data)
    length = struct.unpack_from("<H", data, 7 + 4)[0]  # the first record's data, after both headers
    corrupt[7 + 7 + length // 2] ^= 0xFF
    bad = tmp_path / "corrupt.wandb"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="checksum"):
        list(wandb_records(bad))
    (tmp_path / "other.wandb").write_bytes(b"not a run file")
    with pytest.raises(ValueError, match="not a W&B run file"):
        list(wandb_records(tmp_path / "other.wandb"))


def test_plots_and_sample_tables_land_in_the_offline_run(tmp_path, caplog):
    from PIL import Image

    png = tmp_path / "rates.png"
    Image.new("RGB", (8, 6), "red").save(png)
    t = tracker(tmp_path)
    rows = [{"prompt": "how do i bake bread?", "response": " Mix flour.", "score": 0.5}]
    with caplog.at_level(logging.WARNING, logger="alignlab.tracking"):
        t.log_images({"eval/rates": png, "eval/missing": tmp_path / "missing.png"}, step=2)
    t.log_table("ppo/samples", rows, step=3)
    t.close()
    assert "no image file" in caplog.text and "missing.png" in caplog.text

    (attempt,) = offline_attempts(tmp_path / "wandb", read_wandb_offline(tmp_path).id)
    images = list((attempt / "files" / "media" / "images" / "eval").glob("rates_*.png"))
    assert len(images) == 1 and images[0].read_bytes() == png.read_bytes()
    tables = list((attempt / "files" / "media" / "table").rglob("samples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["prompt", "response", "score"] and table["data"] == [list(rows[0].values())]
    history = {r["step"]: r for r in read_wandb_offline(tmp_path).history}
    assert history[2]["eval/rates"]["_type"] == "image-file"
    assert history[2]["eval/rates"]["path"] == str(images[0].relative_to(attempt / "files"))
    assert "eval/missing" not in history[2] and history[3]["ppo/samples"]["_type"] == "table-file"


def test_resume_keeps_metrics_up_to_the_checkpoint_and_continues_the_wandb_run(tmp_path, caplog):
    first = tracker(tmp_path)
    for step in range(1, 11):
        first.log({"train/loss": 10.0 - step}, step=step)
        if step == 6:
            first.log({"eval/loss": 4.5}, step=6)  # a second row at the checkpoint step is kept as well
    first.close()
    run_id = read_wandb_offline(tmp_path).id
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train/lo')  # the kill that ended the first attempt cut a line short

    # preempted after step 10, resumed from the checkpoint at step 6: steps 7..10 run again, then 11..12
    with caplog.at_level(logging.INFO, logger="alignlab.tracking"):
        second = tracker(tmp_path, resume_step=6)
    assert "kept 7 rows, dropped 4" in caplog.text and "1 unreadable" in caplog.text
    kept = [r["step"] for r in read_metrics(tmp_path)]
    assert kept == [1, 2, 3, 4, 5, 6, 6]  # rewritten before any new row
    second.log({"eval/loss": 4.5}, step=6)  # the set-up logging a kept row again: written once
    for step in range(7, 13):
        second.log({"train/loss": 100.0 + step}, step=step)
    second.close()

    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6, *range(7, 13)]
    after = [r.get("train/loss") for r in rows if r["step"] >= 6]
    assert after == [4.0, None, *(100.0 + s for s in range(7, 13))]
    run = read_wandb_offline(tmp_path)
    assert run.id == run_id and len(run.files) == 2 == len(offline_attempts(tmp_path / "wandb", run_id))
    # W&B keeps one row per step: 1..10 from the first attempt, then only the new steps 11..12
    assert [r["step"] for r in run.history] == list(range(1, 13))
    assert [r["train/loss"] for r in run.history] == [10.0 - s for s in range(1, 11)] + [111.0, 112.0]


def test_a_fresh_run_gets_a_fresh_file_and_wandb_run(tmp_path):
    t = tracker(tmp_path)
    t.log({"train/loss": 1.0}, step=5)
    t.close()
    old_id = read_wandb_offline(tmp_path).id
    t = tracker(tmp_path, resume_step=None)
    t.log({"train/loss": 2.0}, step=1)
    t.close()
    new = read_wandb_offline(tmp_path)
    assert new.id != old_id and [r["step"] for r in new.history] == [1]
    assert read_metrics(tmp_path) == [
        {"step": 1, "time": read_metrics(tmp_path)[0]["time"], "train/loss": 2.0}
    ]


def test_resume_without_an_earlier_wandb_run_starts_one(tmp_path):
    jsonl_only = Tracker(tmp_path, is_main=True, show_progress=False)
    jsonl_only.log({"train/loss": 1.0}, step=3)
    jsonl_only.close()
    t = tracker(tmp_path, resume_step=3)
    t.log({"train/loss": 0.5}, step=4)
    t.close()
    assert [r["step"] for r in read_wandb_offline(tmp_path).history] == [4]
    assert [r["step"] for r in read_metrics(tmp_path)] == [3, 4]


def test_the_wandb_sync_hint_names_the_offline_run_at_start_and_end(tmp_path, caplog):
    def hints() -> list[str]:
        return [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="alignlab.tracking"):
        t = tracker(tmp_path / "run")
        assert len(hints()) == 1
        t.close()
    (attempt,) = offline_attempts(tmp_path / "run" / "wandb", read_wandb_offline(tmp_path / "run").id)
    assert attempt.is_absolute() and (attempt / f"run-{attempt.name.split('-')[-1]}.wandb").exists()
    assert [h.splitlines()[-1].strip() for h in hints()] == [f"wandb sync {attempt}"] * 2

    caplog.clear()  # a resumed run: one command uploads every attempt, oldest first
    with caplog.at_level(logging.INFO, logger="alignlab.tracking"):
        tracker(tmp_path / "run", resume_step=0).close()
    attempts = offline_attempts(tmp_path / "run" / "wandb", read_wandb_offline(tmp_path / "run").id)
    assert len(attempts) == 2 and attempts[0] == attempt
    assert hints()[-1].splitlines()[-1].strip() == "wandb sync " + " ".join(map(str, attempts))

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignlab.tracking"):
        tracker(tmp_path / "disabled", wandb_mode="disabled").close()
    assert hints() == []
