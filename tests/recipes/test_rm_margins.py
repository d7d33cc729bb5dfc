"""stage=rm's default margin (small) on data with and without Llama 2 ratings: margins only where a rating exists
(margin 0 otherwise, counted and logged), plain preference data trains without margins, and an unknown rating
value is an error naming the row."""

from __future__ import annotations

import json

import pytest

from alignlab.data.examples import LengthReport
from alignlab.recipes.rm import margin_summary, pair_margins, pairwise_examples
from tests.conftest import alignlab
from tests.zoo.families import build

PAIR = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello there.", "rejected": " Go away."}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build("gpt2", tmp_path_factory.mktemp("zoo") / "gpt2")


def test_margins_only_where_a_rating_exists():
    rows = [
        {**PAIR, "rating": "significantly better"},
        # a mixed file read through `datasets`: the column is there, the value is not
        {**PAIR, "rating": None},
        {**PAIR},
        {**PAIR, "rating": "unsure"},
        {**PAIR, "rating": ""},
        {**PAIR, "rating": "slightly better"},
    ]
    assert pair_margins(rows, "small") == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0, 1 / 3])
    assert pair_margins(rows, "large") == pytest.approx([3.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    assert pair_margins(rows, "none") is None
    assert pair_margins([PAIR, PAIR], "small") is None  # no rating anywhere: no margin column at all


def test_unknown_rating_is_an_error_naming_the_row():
    rows = [{**PAIR, "rating": "better", "row": 0}, {**PAIR, "rating": "much better", "row": 7}]
    with pytest.raises(ValueError, match=r"prefs.jsonl: row 7 .*'much better'.*stage.margin=none"):
        pair_margins(rows, "small", "prefs.jsonl")
    with pytest.raises(ValueError, match=r"training pair 1 "):  # rows without their source index
        pair_margins([{**PAIR, "rating": "better"}, {**PAIR, "rating": 3}], "small")
    with pytest.raises(ValueError, match="stage.margin='medium'"):
        pair_margins([PAIR], "medium")


def test_margin_summary_lines():
    assert margin_summary(3812, 4000, "small") == (
        "margin=small: 3,812 of 4,000 pairs have a rating and get margins; 188 without one train with margin 0"
    )
    assert margin_summary(0, 10, "small") == "margin=small: no pair has a rating: training without margins"
    assert margin_summary(10, 10, "large") == "margin=large: all 10 pairs have a rating and get margins"
    assert margin_summary(5, 10, "none") == "margin=none: training without margins"


def test_pairwise_examples_count_rated_pairs_that_survive_the_length_filter(gpt2):
    from alignlab import models

    tok = models.load_tokenizer(str(gpt2))
    long = {**PAIR, "chosen": " word" * 300, "rating": "better"}
    rows = [{**PAIR, "rating": "better"}, {**PAIR}, long]
    ds, rated = pairwise_examples(rows, tok, "small", LengthReport(64))
    assert len(ds) == 2 and rated == 1
    assert ds["margin"] == pytest.approx([2 / 3, 0.0])
    ds, rated = pairwise_examples([PAIR, PAIR], tok, "small", LengthReport(64))
    assert "margin" not in ds.column_names and rated == 0


def run_rm(tmp_path, model, rows, name):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / name
    proc = alignlab(
        "stage=rm",
        f"model.name_or_path={model}",
        f"stage.init_from={model}",
        "data=local",
        f"data.source={data}",
        "data.format=preference",
        f"run_dir={run_dir}",
        "stage.normalize_samples=0",
        "stage.steps=1",
        "stage.batch_size=2",
        "stage.micro_batch_size=2",
        "stage.eval_rows=2",
        "logger.progress=false",
        cwd=tmp_path,
    )
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if "data/pairs_with_margin" in m)
    return proc.stdout + proc.stderr, first["data/pairs_with_margin"]


@pytest.mark.parametrize("kind", ["plain", "mixed"])
def test_default_margin_trains_on_plain_and_mixed_data(tmp_path, gpt2, kind):
    rows = [{**PAIR, "chosen": f" Hello {i}."} for i in range(8)]
    if kind == "mixed":  # 2 of the 8 held out; the seeded split decides which, so count the training ones
        rows = [{**r, "rating": "better"} if i % 2 else r for i, r in enumerate(rows)]
    out, with_margin = run_rm(tmp_path, gpt2, rows, kind)
    if kind == "plain":
        assert "margin=small: no pair has a rating: training without margins" in out and with_margin == 0
    else:
        assert f"margin=small: {with_margin} of 6 pairs have a rating and get margins" in out
        assert f"{6 - with_margin} without one train with margin 0" in out and 0 < with_margin < 6
