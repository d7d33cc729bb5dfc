import logging
import pickle

import datasets
import pytest

from alignlab.data.formats import (
    ASSISTANT,
    HUMAN,
    MalformedRowError,
    SkipReport,
    canonicalize,
    hh_to_messages,
    messages_to_hh,
    parse_hh,
    render_hh,
    split_hh,
)

ONE = "\n\nHuman: how do i bake bread?\n\nAssistant: Sure. Mix the flour."
MULTI = (
    "\n\nHuman: how do i bake bread?\n\nAssistant: Sure. Mix the flour.\n\nWith water."
    "\n\nHuman: and then?\n\nAssistant: Bake it for 40 minutes."
)
PROMPT = "\n\nHuman: how do i bake bread?\n\nAssistant:"
MESSAGES = [
    {"role": "user", "content": "how do i bake bread?"},
    {"role": "assistant", "content": "Sure. Mix the flour."},
]


def ds(**columns) -> datasets.Dataset:
    return datasets.Dataset.from_dict(columns)


# ---------------------------------------------------------------- HH transcripts


def test_parse_single_turn():
    assert parse_hh(ONE) == [("user", " how do i bake bread?"), ("assistant", " Sure. Mix the flour.")]


def test_parse_multi_turn_keeps_blank_lines_inside_a_turn():
    turns = parse_hh(MULTI)
    assert [role for role, _ in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[1] == ("assistant", " Sure. Mix the flour.\n\nWith water.")


@pytest.mark.parametrize(
    "text", [ONE, MULTI, PROMPT, "\n\nHuman:hi\n\nAssistant:  two  ", "\n\nHuman: a\n\nAssistant: Human: b"]
)
def test_render_is_the_exact_inverse_of_parse(text):
    assert render_hh(parse_hh(text)) == text


def test_split_hh():
    assert split_hh(ONE) == (PROMPT, " Sure. Mix the flour.")
    prompt, completion = split_hh(MULTI)
    assert prompt.endswith("\n\nHuman: and then?" + ASSISTANT) and prompt.startswith(HUMAN)
    assert completion == " Bake it for 40 minutes."
    assert prompt + completion == MULTI


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "does not start with"),
        ("Human: hi\n\nAssistant: yo", "does not start with"),
        (" \n\nHuman: hi\n\nAssistant: yo", "does not start with"),
        ("\n\nAssistant: hi\n\nHuman: yo", "does not start with"),
        ("\n\nHuman: hi", "no assistant turn"),
        ("\n\nHuman: hi\n\nHuman: again\n\nAssistant: yo", "two user turns in a row"),
        ("\n\nHuman: hi\n\nAssistant: yo\n\nAssistant: yo", "two assistant turns in a row"),
    ],
)
def test_parse_rejects_malformed_transcripts(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_hh(text)


def test_split_rejects_a_transcript_ending_with_the_user():
    with pytest.raises(ValueError, match="ends with a user turn"):
        split_hh(ONE + "\n\nHuman: thanks")


def test_messages_round_trip():
    assert hh_to_messages(ONE) == MESSAGES
    assert messages_to_hh(MESSAGES) == ONE
    assert messages_to_hh(hh_to_messages(MULTI)) == MULTI


def test_messages_to_hh_writes_a_system_turn_before_the_first_tag():
    text = messages_to_hh([{"role": "system", "content": "be nice"}, *MESSAGES])
    assert text == "be nice" + messages_to_hh(MESSAGES)
    assert hh_to_messages(text) == [{"role": "system", "content": "be nice"}, *MESSAGES]
    with pytest.raises(ValueError, match="does not start with"):  # a file's transcript has no system preamble
        parse_hh(text)


# ---------------------------------------------------------------- conversions


def test_hh_to_text_uses_chosen_or_text_column():
    out, report = canonicalize(ds(chosen=[ONE], rejected=[ONE + "x"]), "hh", "text", source="s")
    assert out.to_list() == [{"text": ONE}] and report.total == 0
    out, _ = canonicalize(ds(text=[MULTI]), "hh", "text", source="s")
    assert out.to_list() == [{"text": MULTI}]


def test_hh_to_prompt_completion():
    out, _ = canonicalize(ds(text=[ONE, MULTI]), "hh", "prompt_completion", source="s")
    assert out[0] == {"prompt": PROMPT, "completion": " Sure. Mix the flour."}
    assert out[1]["prompt"] + out[1]["completion"] == MULTI


def test_hh_to_preference_splits_off_the_shared_prompt_and_passes_extras_through():
    data = ds(chosen=[ONE], rejected=[PROMPT + " No."], margin=[1.5], is_safety=[True])
    out, _ = canonicalize(data, "hh", "preference", source="s")
    assert out.column_names == ["prompt", "chosen", "rejected", "margin", "is_safety"]
    assert out[0] == {
        "prompt": PROMPT,
        "chosen": " Sure. Mix the flour.",
        "rejected": " No.",
        "margin": 1.5,
        "is_safety": True,
    }
    assert out.features["margin"] == data.features["margin"]


def test_hh_to_messages():
    out, _ = canonicalize(ds(chosen=[ONE]), "hh", "messages", source="s")
    assert out[0] == {"messages": MESSAGES}


def test_prompt_completion_conversions():
    data = ds(prompt=[PROMPT], completion=[" Sure."])
    assert canonicalize(data, "prompt_completion", "text", source="s")[0][0] == {"text": PROMPT + " Sure."}
    assert canonicalize(data, "prompt_completion", "prompt_completion", source="s")[0][0] == data[0]


def test_preference_conversions_keep_extras():
    data = ds(prompt=["p"], chosen=[" good"], rejected=[" bad"], rating=[7])
    out, _ = canonicalize(data, "preference", "preference", source="s")
    assert out.to_list() == data.to_list()
    out, _ = canonicalize(data, "preference", "prompt_completion", source="s")
    assert out.to_list() == [{"prompt": "p", "completion": " good", "rating": 7}]


def test_messages_conversions():
    data = ds(messages=[MESSAGES])
    assert canonicalize(data, "messages", "text", source="s")[0][0] == {"text": ONE}
    pc = canonicalize(data, "messages", "prompt_completion", source="s")[0][0]
    assert pc == {"prompt": PROMPT, "completion": " Sure. Mix the flour."}
    with_system = [{"role": "system", "content": "be brief"}, *MESSAGES]
    out, _ = canonicalize(ds(messages=[with_system]), "messages", "messages", source="s")
    assert out[0] == {"messages": with_system}


def test_text_to_text():
    out, _ = canonicalize(ds(text=["once upon a time"], id=[3]), "text", "text", source="s")
    assert out.to_list() == [{"text": "once upon a time", "id": 3}]


def test_skipping_keeps_extra_columns_aligned_on_a_shuffled_dataset():
    data = ds(
        prompt=["p"] * 6,
        chosen=[" a", " b", " c", " d", " e", " f"],
        rejected=[" x", " b", " y", " d", " z", " w"],
        row=list(range(6)),
    ).shuffle(seed=1)
    out, report = canonicalize(data, "preference", "preference", source="s", on_malformed="skip")
    assert report.total == 2 and len(out) == 4
    for row in out:
        assert row == data.filter(lambda r, want=row["row"]: r["row"] == want)[0]


def test_impossible_conversion_names_both_formats_and_the_supported_ones():
    with pytest.raises(ValueError, match=r"cannot convert 'text' rows to 'preference'.*hh -> preference"):
        canonicalize(ds(text=["a"]), "text", "preference", source="s")


def test_unknown_on_malformed_value():
    with pytest.raises(ValueError, match="on_malformed"):
        canonicalize(ds(text=["a"]), "text", "text", source="s", on_malformed="ignore")


@pytest.mark.parametrize(
    "source_format, target, columns, missing",
    [
        ("hh", "preference", {"chosen": [ONE]}, "rejected"),
        ("hh", "text", {"prompt": [ONE]}, "'chosen' or 'text'"),
        ("preference", "preference", {"prompt": ["p"], "chosen": [" a"]}, "rejected"),
        ("messages", "text", {"text": ["a"]}, "messages"),
    ],
)
def test_a_missing_column_is_a_dataset_level_error(source_format, target, columns, missing):
    with pytest.raises(ValueError, match=missing) as info:
        canonicalize(ds(**columns), source_format, target, source="my.jsonl")
    assert not isinstance(info.value, MalformedRowError)
    assert "my.jsonl" in str(info.value) and "columns present" in str(info.value)


# ---------------------------------------------------------------- malformed rows

GOOD_ROWS = {
    "hh": [{"chosen": ONE, "rejected": PROMPT + " No."}, {"chosen": MULTI, "rejected": MULTI + "!"}],
    "prompt_completion": [{"prompt": "p", "completion": " a"}] * 2,
    "preference": [{"prompt": "p", "chosen": " a", "rejected": " b"}] * 2,
    "messages": [{"messages": MESSAGES}] * 2,
    "text": [{"text": "a"}] * 2,
}
SYSTEM = {"role": "system", "content": "be brief"}
BAD_ROWS = [
    # (source_format, target, bad row, problem); the bad row follows two good ones, so it is row 2
    ("hh", "text", {"chosen": "\n\nHuman: hi", "rejected": ONE}, "no assistant turn"),
    ("hh", "text", {"chosen": "Human: hi\n\nAssistant: yo", "rejected": ONE}, r'start with "\\n\\nHuman:"'),
    ("hh", "prompt_completion", {"chosen": PROMPT + "  ", "rejected": ONE}, "empty completion"),
    ("hh", "prompt_completion", {"chosen": None, "rejected": ONE}, "None in column 'chosen'"),
    (
        "hh",
        "prompt_completion",
        {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": ONE},
        "two user turns in a row",
    ),
    ("hh", "preference", {"chosen": ONE, "rejected": PROMPT}, "empty rejected response"),
    ("hh", "preference", {"chosen": ONE, "rejected": ONE}, "chosen and rejected are identical"),
    ("hh", "preference", {"chosen": ONE, "rejected": MULTI}, "do not share the prompt"),
    ("hh", "preference", {"chosen": "\n\nHuman: hi", "rejected": ONE}, "chosen: no assistant turn"),
    ("prompt_completion", "text", {"prompt": "p", "completion": ""}, "empty completion"),
    ("preference", "preference", {"prompt": "p", "chosen": " ", "rejected": " x"}, "empty chosen response"),
    (
        "preference",
        "prompt_completion",
        {"prompt": None, "chosen": " a", "rejected": " b"},
        "None in column 'prompt'",
    ),
    ("messages", "prompt_completion", {"messages": MESSAGES[:1]}, "no assistant turn"),
    ("messages", "prompt_completion", {"messages": MESSAGES + MESSAGES[:1]}, "ends with a user turn"),
    ("messages", "messages", {"messages": MESSAGES[1:]}, "does not start with a user turn"),
    ("messages", "messages", {"messages": MESSAGES[:1] + MESSAGES}, "two user turns in a row"),
    ("messages", "messages", {"messages": [{"role": "bot", "content": "x"}]}, "role is not one of"),
    ("messages", "messages", {"messages": [{"role": "user", "content": None}]}, "content is not a string"),
    ("messages", "messages", {"messages": [*MESSAGES, SYSTEM]}, "system message after the first"),
    ("text", "text", {"text": " \n"}, "empty text"),
]


@pytest.mark.parametrize("source_format, target, bad, problem", BAD_ROWS)
def test_malformed_row_raises_naming_source_and_row(source_format, target, bad, problem):
    data = datasets.Dataset.from_list(GOOD_ROWS[source_format] + [bad])
    with pytest.raises(MalformedRowError, match=problem) as info:
        canonicalize(data, source_format, target, source="hh-rlhf")
    error = info.value
    assert (error.source, error.row) == ("hh-rlhf", 2)
    assert str(error).startswith("hh-rlhf, row 2: ") and "data.on_malformed=skip" in str(error)


@pytest.mark.parametrize("source_format, target, bad, problem", BAD_ROWS)
def test_skip_mode_drops_counts_and_logs(source_format, target, bad, problem, caplog):
    data = datasets.Dataset.from_list(GOOD_ROWS[source_format] + [bad])
    with caplog.at_level(logging.WARNING, logger="alignlab.data"):
        out, report = canonicalize(data, source_format, target, source="hh-rlhf", on_malformed="skip")
    assert len(out) == 2 and report.total == 1 and report.rows == 3
    [(row, reported)] = report.examples
    assert row == 2 and report.by_problem == {reported: 1}
    [record] = caplog.records
    assert "hh-rlhf: skipped 1 of 3 rows" in record.getMessage() and "\n" not in record.getMessage()


def test_a_non_string_column_is_malformed():
    with pytest.raises(MalformedRowError, match="column 'prompt' is neither a string") as info:
        canonicalize(ds(prompt=[1, 2], completion=[" a", " b"]), "prompt_completion", "text", source="s")
    assert info.value.row == 0


def test_error_mode_reports_the_first_bad_row():
    data = ds(text=["ok", "", "also ok", ""])
    with pytest.raises(MalformedRowError) as info:
        canonicalize(data, "text", "text", source="s")
    assert info.value.row == 1


def test_skip_report_counts_by_problem(caplog):
    data = ds(prompt=["p"] * 5, completion=[" a", "", None, " ", " b"])
    with caplog.at_level(logging.WARNING, logger="alignlab.data"):
        out, report = canonicalize(data, "prompt_completion", "text", source="s", on_malformed="skip")
    assert out["text"] == ["p a", "p b"]
    assert report.total == 3
    assert report.by_problem == {"empty completion": 2, "None in column 'completion'": 1}
    none = "None in column 'completion'"
    assert report.examples == [(1, "empty completion"), (2, none), (3, "empty completion")]
    assert report.summary() == caplog.records[0].getMessage()
    assert report.summary().startswith("s: skipped 3 of 5 rows as malformed (2 x empty completion; 1 x None")


def test_clean_data_logs_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="alignlab.data"):
        _, report = canonicalize(ds(text=["a"]), "text", "text", source="s", on_malformed="skip")
    assert not caplog.records and report.total == 0
    assert report.summary() == "s: no malformed rows among 1"


def test_all_rows_skipped_gives_an_empty_dataset_with_canonical_columns():
    out, report = canonicalize(ds(text=["", " "], n=[1, 2]), "text", "text", source="s", on_malformed="skip")
    assert len(out) == 0 and out.column_names == ["text", "n"] and report.total == 2


def test_malformed_row_error_pickles():
    error = pickle.loads(pickle.dumps(MalformedRowError("s", 4, "empty text")))
    assert (error.source, error.row, error.problem) == ("s", 4, "empty text")
    assert str(error).startswith("s, row 4: empty text")


def test_skip_report_keeps_only_the_first_examples():
    report = SkipReport(source="s", rows=100)
    for row in range(20):
        report.add(row, "empty text")
    assert report.total == 20 and len(report.examples) == SkipReport.max_examples


# ---------------------------------------------------------------- TRL's conversational formats, CRLF, row numbers

USER = [{"role": "user", "content": "how do i bake bread?"}]
SURE = [{"role": "assistant", "content": "Sure. Mix the flour."}]
NO = [{"role": "assistant", "content": "No."}]


def test_conversational_prompt_completion_becomes_the_hh_transcript():
    out, _ = canonicalize(
        ds(prompt=[USER], completion=[SURE]), "prompt_completion", "prompt_completion", source="s"
    )
    assert out[0] == {"prompt": PROMPT, "completion": " Sure. Mix the flour."}
    system = [{"role": "system", "content": "Be brief."}, *USER]
    out, _ = canonicalize(
        ds(prompt=[system], completion=[SURE]), "prompt_completion", "prompt_completion", source="s"
    )
    assert out[0]["prompt"] == "Be brief." + PROMPT  # the system turn as the text before the first tag
    with pytest.raises(MalformedRowError, match="not one assistant message"):
        canonicalize(
            ds(prompt=[USER], completion=[USER]), "prompt_completion", "prompt_completion", source="s"
        )


def test_conversational_preference_explicit_and_implicit_prompt():
    explicit, _ = canonicalize(
        ds(prompt=[USER], chosen=[SURE], rejected=[NO]), "preference", "preference", source="s"
    )
    implicit, _ = canonicalize(
        ds(chosen=[USER + SURE], rejected=[USER + NO]), "preference", "preference", source="s"
    )
    expected = {"prompt": PROMPT, "chosen": " Sure. Mix the flour.", "rejected": " No."}
    assert explicit[0] == expected and implicit[0] == expected
    prompts, _ = canonicalize(
        ds(chosen=[USER + SURE], rejected=[USER + NO]), "preference", "prompt_completion", source="s"
    )
    assert prompts[0] == {"prompt": PROMPT, "completion": " Sure. Mix the flour."}
    other = [{"role": "user", "content": "something else"}]
    with pytest.raises(MalformedRowError, match="do not share the prompt"):
        canonicalize(ds(chosen=[USER + SURE], rejected=[other + NO]), "preference", "preference", source="s")


def test_crlf_transcripts_are_read_as_lf_and_counted(caplog):
    crlf = ONE.replace("\n", "\r\n")
    with caplog.at_level(logging.INFO, logger="alignlab.data"):
        out, _ = canonicalize(
            ds(chosen=[crlf, ONE], rejected=[crlf + "!", ONE + "!"]), "hh", "preference", source="f"
        )
    assert out[0]["prompt"] == PROMPT and out[0]["chosen"] == " Sure. Mix the flour."
    assert "1 of 2 rows had CRLF" in caplog.text


def test_kept_rows_are_the_source_row_numbers():
    _, report = canonicalize(ds(text=["a", "", "b", " "]), "text", "text", source="s", on_malformed="skip")
    assert report.kept == [0, 2] and report.total == 2
