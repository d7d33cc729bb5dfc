"""What a user reads about their data (issue 18, item 12): rows named by their place in the file, not in a shuffled
list; what was skipped said once; CRLF transcripts read as LF."""

from __future__ import annotations

import json
import logging

from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

from alignlab.config import register_configs
from alignlab.data.examples import LengthReport
from alignlab.finetune import tokenize
from alignlab.recipes.sft import load_demonstrations
from tests.conftest import ROOT
from tests.zoo.families import build

register_configs()


def cfg_for(path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=["stage=sft", "data=local", f"data.source={path}", "data.format=hh", *overrides],
        )


def test_rows_are_named_by_their_file_row_and_skips_are_logged_once(tmp_path, caplog):
    long_answer = " word" * 300
    rows = []
    for i in range(40):
        answer = long_answer if i in (7, 31) else f" answer {i}"
        rows.append({"chosen": f"\n\nHuman: question {i}\n\nAssistant:{answer}"})
    rows[12] = {"chosen": "no tags here"}  # malformed, skipped
    rows[20] = {"chosen": rows[20]["chosen"].replace("\n", "\r\n")}  # exported on Windows: read as LF
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_for(path, "data.on_malformed=skip", "stage.eval_rows=4")
    with caplog.at_level(logging.INFO):
        train, held_out, source, report = load_demonstrations(cfg, None)
    assert sum("skipped 1 of 40 rows" in r.getMessage() for r in caplog.records) == 1  # said once
    assert "1 of 40 rows had CRLF" in caplog.text
    assert report.total == 1 and len(train) + len(held_out) == 39
    assert {r["row"] for r in train + held_out} == set(range(40)) - {12}
    crlf = next(r for r in train + held_out if r["row"] == 20)
    assert crlf["prompt"] == "\n\nHuman: question 20\n\nAssistant:"

    tok = AutoTokenizer.from_pretrained(build("gpt2", tmp_path / "zoo"))
    lengths = LengthReport(max_length=64)
    tokenize(train + held_out, tok, "last_turn", lengths)
    # the train rows are in a shuffled order; the report names the rows of the file
    assert sorted(lengths.examples) == [7, 31] and "first rows of the source, 0-based: " in lengths.summary(
        source, "truncated"
    )
