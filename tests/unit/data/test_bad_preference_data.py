"""Bad preference data fails fast naming the file and row (or is skipped and counted under on_malformed=skip)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from alignlab.config import register_configs
from alignlab.data.formats import MalformedRowError
from alignlab.recipes.rm import load_comparisons
from tests.conftest import ROOT

register_configs()
GOOD = {
    "prompt": "\n\nHuman: hi\n\nAssistant:",
    "chosen": " hello.",
    "rejected": " go away.",
    "rating": "better",
}


def cfg_for(path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=["stage=rm", "data=local", f"data.source={path}", "data.format=preference", *overrides],
        )


def write(tmp_path, rows):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "bad,problem",
    [
        ({**GOOD, "rejected": GOOD["chosen"]}, "chosen and rejected are identical"),
        ({**GOOD, "chosen": "  "}, "empty chosen response"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, bad, problem):
    path = write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(MalformedRowError) as e:
        load_comparisons(cfg_for(path), None, "train")
    assert e.value.row == 2 and problem in str(e.value) and str(path) in str(e.value)
    rows, *_ = load_comparisons(cfg_for(path, "data.on_malformed=skip"), None, "train")
    assert len(rows) == 3


def test_missing_column(tmp_path):
    path = write(tmp_path, [{k: v for k, v in GOOD.items() if k != "rejected"}])
    with pytest.raises(ValueError, match=r"needs column\(s\) \['rejected'\]"):
        load_comparisons(cfg_for(path), None, "train")


def test_subset_needs_the_safety_flag(tmp_path):
    path = write(tmp_path, [GOOD])
    with pytest.raises(ValueError, match="is_safety"):
        load_comparisons(cfg_for(path, "stage.subset=safety"), None, "train")


def test_kway_rows_are_checked(tmp_path):
    path = tmp_path / "ranked.jsonl"
    rows = [
        {"prompt": "p", "responses": [" a", " b"], "ranks": [0, 1]},
        {"prompt": "p", "responses": [" a", " b"], "ranks": [1, 1]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MalformedRowError, match="row 1: every response has the same rank"):
        load_comparisons(cfg_for(path, "stage.ranking=kway"), None, "train")
