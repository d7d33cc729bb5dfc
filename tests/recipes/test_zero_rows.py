"""Zero training rows (every row skipped as malformed, or the only row held out) fail with one clear error that
counts what was read, skipped (and why) and held out, and says what to do; never TRL's KeyError('completion_mask').
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import alignlab
from tests.zoo.families import build


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build("gpt2", tmp_path_factory.mktemp("zoo") / "gpt2")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft(tmp_path, model, data, *extra):
    return alignlab(
        "stage=sft",
        f"model.name_or_path={model}",
        f"stage.init_from={model}",
        "data=local",
        f"data.source={data}",
        "data.format=prompt_completion",
        f"run_dir={tmp_path / 'sft'}",
        "stage.sample_eval=0",
        "stage.steps=1",
        "stage.batch_size=2",
        "stage.micro_batch_size=2",
        "logger.progress=false",
        *extra,
        cwd=tmp_path,
        check=False,
    )


def test_sft_every_row_skipped(tmp_path, gpt2):
    bad = {"prompt": "Question: hi?\nAnswer:", "completion": "   "}  # an empty answer is malformed
    data = write(tmp_path / "bad.jsonl", [bad, bad, bad])
    proc = sft(tmp_path, gpt2, data, "data.on_malformed=skip")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "completion_mask" not in out
    assert "no demonstrations left to train on" in out
    assert "3 row(s) read" in out and "skipped 3 of 3 rows as malformed" in out
    assert "0 held out" in out and "data.eval_split" in out and "stage.eval_rows" in out


def test_sft_one_row_goes_to_held_out(tmp_path, gpt2):
    data = write(tmp_path / "one.jsonl", [{"prompt": "Question: hi?\nAnswer:", "completion": " Hello."}])
    proc = sft(tmp_path, gpt2, data)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "completion_mask" not in out
    assert "1 row(s) read" in out and "none skipped as malformed" in out
    assert "1 held out for the answer-token loss" in out


def test_rm_one_pair_goes_to_held_out(tmp_path, gpt2):
    pair = {"prompt": "Question: hi?\nAnswer:", "chosen": " Hello.", "rejected": " Go away."}
    data = write(tmp_path / "pairs.jsonl", [pair, {**pair, "chosen": " "}])
    proc = alignlab(
        "stage=rm",
        f"model.name_or_path={gpt2}",
        f"stage.init_from={gpt2}",
        "data=local",
        f"data.source={data}",
        "data.format=preference",
        "data.on_malformed=skip",
        f"run_dir={tmp_path / 'rm'}",
        "stage.normalize_samples=0",
        "logger.progress=false",
        cwd=tmp_path,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "no training comparisons: 1 usable row(s) read" in out
    assert "skipped 1 of 2 rows as malformed" in out and "1 held out for accuracy" in out


@pytest.fixture(scope="module")
def gpt2_rm(gpt2, tmp_path_factory):
    """A random score head on the zoo model: scores to select with (their values do not matter here)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("zoo") / "gpt2_rm"
    tok = AutoTokenizer.from_pretrained(gpt2)
    rm = AutoModelForSequenceClassification.from_pretrained(gpt2, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def rejection_sampling(tmp_path, model, rm, truncated):
    prompts = write(tmp_path / "prompts.jsonl", [{"prompt": f"Question: {w}?\nAnswer:"} for w in "abcdefgh"])
    run_dir = tmp_path / f"rs_{truncated}"
    proc = alignlab(
        "stage=rejection_sampling",
        f"model.name_or_path={model}",
        f"stage.init_from={model}",
        f"reward.reward_model={rm}",
        "data=local",
        f"data.source={prompts}",
        f"run_dir={run_dir}",
        f"stage.truncated={truncated}",
        "stage.iterations=1",
        "stage.prompts_per_iteration=4",
        "stage.samples_per_prompt=2",
        "stage.max_new_tokens=1",  # a random model with ~500 tokens almost never says EOS first: all truncated
        "stage.eval_prompts=2",
        "stage.sample_eval=0",
        "stage.finetune.steps=1",
        "stage.finetune.batch_size=2",
        "stage.finetune.micro_batch_size=2",
        "logger.progress=false",
        cwd=tmp_path,
        check=False,
    )
    return proc, run_dir


def test_rejection_sampling_whose_every_answer_is_truncated_keeps_nothing(tmp_path, gpt2, gpt2_rm):
    proc, run_dir = rejection_sampling(tmp_path, gpt2, gpt2_rm, "drop")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "completion_mask" not in out
    assert "every one of the 8 candidate answers ran out of budget" in out
    assert "stage.max_new_tokens" in out and "stage.truncated=keep" in out

    proc, run_dir = rejection_sampling(tmp_path, gpt2, gpt2_rm, "keep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row = next(m for m in metrics if "rs/kept_rows" in m)
    assert row["rs/kept_rows"] == 4 and row["rs/truncated_kept"] == 4 and row["rs/truncated_dropped"] == 0
