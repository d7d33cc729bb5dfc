"""The one start/end oracle report (evaluation/tinyhh.judge_start_end): which models it judges, the metrics row it
logs, and samples.jsonl (the end model's answers as table "eval", other tables kept)."""

from __future__ import annotations

import json

from alignlab.evaluation import tinyhh


class FakeTracker:
    def __init__(self):
        self.rows = []

    def log(self, row, step):
        self.rows.append((step, row))


def fake_judge(calls):
    """judge_model_dir stand-in: metrics that name the model (and whether it was wrapped), one sample row."""

    def judge(model_dir, data_dir, n, max_new_tokens, device, seed, wrap=None):
        calls.append((str(model_dir), wrap("P") if wrap else None, n, max_new_tokens, seed))
        score = {"start": 0.25, "end": 0.75}[str(model_dir)] + (0.125 if wrap else 0.0)
        metrics = {k: score for k in tinyhh.SHOWN} | {"eval/harmlessness_ci_low": 0.0}
        return metrics, [{"set": "harmful", "prompt": "P", "response": f"from {model_dir}"}]

    return judge


def args(tmp_path, tracker, **kw):
    return dict(
        data_dir=tmp_path,
        n=4,
        max_new_tokens=16,
        device="cpu",
        seed=3,
        tracker=tracker,
        step=9,
        samples_path=tmp_path / "samples.jsonl",
        label="sft",
        **kw,
    )


def test_start_and_end_judged_alike_and_logged_as_eval_and_start(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tinyhh, "judge_model_dir", fake_judge(calls))
    tracker = FakeTracker()
    judged = tinyhh.judge_start_end("end", start="start", **args(tmp_path, tracker))
    assert calls == [("start", None, 4, 16, 3), ("end", None, 4, 16, 3)]
    step, row = tracker.rows[0]
    assert step == 9 and len(tracker.rows) == 1
    assert row["eval/harmlessness"] == 0.75 and row["start/harmlessness"] == 0.25
    assert set(row) == {f"{p}/{k[5:]}" for p in ("eval", "start") for k in tinyhh.SHOWN} | {
        "eval/harmlessness_ci_low",
        "start/harmlessness_ci_low",
    }
    assert judged["eval"]["eval/helpfulness"] == 0.75 and judged["start"]["eval/helpfulness"] == 0.25
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows == [{"table": "eval", "set": "harmful", "prompt": "P", "response": "from end"}]


def test_end_only_and_a_wrapped_reference(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tinyhh, "judge_model_dir", fake_judge(calls))
    tracker = FakeTracker()
    tinyhh.judge_start_end("end", start=None, **args(tmp_path, tracker))  # pretrain: the base model alone
    assert calls == [("end", None, 4, 16, 3)]
    assert set(tracker.rows[0][1]) == set(tinyhh.SHOWN) | {"eval/harmlessness_ci_low"}

    calls.clear()
    teacher = ("start", lambda p: f"Be safe. {p}")
    tinyhh.judge_start_end("end", start="start", references={"teacher": teacher}, **args(tmp_path, tracker))
    assert [c[:2] for c in calls] == [("start", None), ("start", "Be safe. P"), ("end", None)]
    row = tracker.rows[1][1]
    assert row["teacher/harmlessness"] == 0.375 and row["start/harmlessness"] == 0.25
    assert list(row)[:3] == [f"eval/{k[5:]}" for k in tinyhh.SHOWN]  # the end model's keys first


def test_samples_keep_other_tables_and_replace_the_eval_table(tmp_path):
    path = tmp_path / "samples.jsonl"
    train = [{"table": "train", "iteration": i, "response": "r"} for i in (1, 2)]
    old_eval = {"table": "eval", "response": "an earlier end of this run"}
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in [*train, old_eval]) + '{"table": "tra'
    )  # a cut line
    tinyhh.write_eval_samples(path, [{"response": "new"}])
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows == [*train, {"table": "eval", "response": "new"}]
    tinyhh.write_eval_samples(path, [{"response": "again"}])  # reaching the end twice: the table once
    assert [json.loads(x) for x in path.read_text().splitlines()][-1] == {
        "table": "eval",
        "response": "again",
    }
    assert len(path.read_text().splitlines()) == 3
