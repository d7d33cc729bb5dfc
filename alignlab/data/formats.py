"""Format adapters: turn rows of a known source format into the canonical rows every stage consumes.

Canonical rows: text {"text"}, prompt_completion {"prompt", "completion"}, preference {"prompt", "chosen",
"rejected"} and messages {"messages": [{"role", "content"}]}. The HH transcript
("\\n\\nHuman: ...\\n\\nAssistant: ...") is the one chat rendering: text and prompt_completion rows built
from messages use it too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, ClassVar

import datasets
import pyarrow as pa

from alignlab.errors import DataError

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TAG_OF_ROLE = {"user": HUMAN, "assistant": ASSISTANT}
_ROLE_OF_TAG = {HUMAN: "user", ASSISTANT: "assistant"}
_TAGS = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")
_ROLES = ("user", "assistant", "system")

log = logging.getLogger("alignlab.data")


class FormatProblem(ValueError):
    """A row that does not fit its format; str(error) is a short description shared by all such rows."""


class MalformedRowError(DataError):
    """A malformed row met under data.on_malformed=error."""

    def __init__(self, source: str, row: int, problem: str):
        self.source, self.row, self.problem = source, row, problem
        super().__init__(f"{source}, row {row}: {problem} (set data.on_malformed=skip to drop such rows)")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions unpickle as cls(*args); keep that working when raised inside worker processes.
        return type(self), (self.source, self.row, self.problem)


@dataclass
class SkipReport:
    """Rows dropped under on_malformed=skip, counted by problem."""

    source: str = ""
    rows: int = 0  # rows examined
    total: int = 0  # rows skipped
    by_problem: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[int, str]] = field(default_factory=list)  # first few (row, problem)
    kept: list[int] = field(default_factory=list)  # the source rows kept, in order (row numbers for messages)
    max_examples: ClassVar[int] = 5

    def add(self, row: int, problem: str) -> None:
        """Count one skipped row."""
        self.total += 1
        self.by_problem[problem] = self.by_problem.get(problem, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append((row, problem))

    def summary(self) -> str:
        """One readable line: how many rows were skipped, why, and where the first ones are."""
        if not self.total:
            return f"{self.source}: no malformed rows among {self.rows}"
        counts = "; ".join(f"{n} x {p}" for p, n in sorted(self.by_problem.items(), key=lambda kv: -kv[1]))
        first = ", ".join(str(row) for row, _ in self.examples)
        skipped = f"skipped {self.total} of {self.rows} rows as malformed"
        return f"{self.source}: {skipped} ({counts}); first rows: {first}"


# ---------------------------------------------------------------- HH transcripts and messages


def _check_turns(turns: Sequence[tuple[str, str]]) -> None:
    """Raise FormatProblem unless turns start with the user, alternate, and include an assistant answer."""
    if not turns or turns[0][0] != "user":
        raise FormatProblem("conversation does not start with a user turn")
    for (previous, _), (role, _) in pairwise(turns):
        if role == previous:
            raise FormatProblem(f"two {role} turns in a row")
    if not any(role == "assistant" for role, _ in turns):
        raise FormatProblem("no assistant turn")


def parse_hh(text: str, system: bool = False) -> list[tuple[str, str]]:
    """Split an HH transcript into (role, content) turns; content keeps its leading space.

    system: text before the first "\\n\\nHuman:" is a system turn (how alignlab writes a conversation's system
    message, or a safety preprompt, in HH form); otherwise such text makes the transcript malformed.
    """
    pieces = _TAGS.split(text)
    turns = [("system", pieces[0])] if pieces[0] and system else []
    if (pieces[0] and not system) or len(pieces) == 1 or pieces[1] != HUMAN:
        raise FormatProblem(r'transcript does not start with "\n\nHuman:"')
    turns += [(_ROLE_OF_TAG[tag], content) for tag, content in zip(pieces[1::2], pieces[2::2], strict=True)]
    _check_turns(turns[1:] if turns[0][0] == "system" else turns)
    return turns


def render_hh(turns: Iterable[tuple[str, str]]) -> str:
    """Join (role, content) turns into an HH transcript (a system turn as the text before the first tag); the exact
    inverse of parse_hh."""
    out = []
    for i, (role, content) in enumerate(turns):
        if role == "system" and i == 0:
            out.append(content)
        elif role in _TAG_OF_ROLE:
            out.append(_TAG_OF_ROLE[role] + content)
        else:
            raise FormatProblem(f"{role} turns have no HH rendering")
    return "".join(out)


def split_hh(text: str, system: bool = False) -> tuple[str, str]:
    """Split an HH transcript into (prompt up to and including the last "\\n\\nAssistant:", final answer)."""
    role, answer = parse_hh(text, system)[-1]
    if role != "assistant":
        raise FormatProblem("transcript ends with a user turn, not an assistant answer")
    return text[: len(text) - len(answer)], answer


def _message_turns(messages: Any) -> list[tuple[str, str]]:
    """Validate a messages list and return its (role, content) turns, system turn included."""
    if not isinstance(messages, (list, tuple)):
        raise FormatProblem("messages is not a list")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise FormatProblem(f"message role is not one of {', '.join(_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise FormatProblem("message content is not a string")
        if message["role"] == "system" and i:
            raise FormatProblem("system message after the first message")
        turns.append((message["role"], message["content"]))
    _check_turns(turns[1:] if turns and turns[0][0] == "system" else turns)
    return turns


def messages_to_hh(messages: Sequence[dict[str, str]]) -> str:
    """Render chat messages as an HH transcript (one space after each role tag, as in hh-rlhf)."""
    turns = _message_turns(messages)
    return render_hh(
        (role, f" {content}" if content and role != "system" else content) for role, content in turns
    )


def hh_to_messages(text: str) -> list[dict[str, str]]:
    """Parse an HH transcript into chat messages, dropping the one space after each role tag.

    messages_to_hh puts that space back, so the round trip is exact for hh-rlhf style transcripts.
    """
    return [
        {"role": role, "content": c[1:] if c.startswith(" ") and role != "system" else c}
        for role, c in parse_hh(text, system=True)
    ]


# ---------------------------------------------------------------- row converters


def _response(text: str, what: str) -> str:
    if not text.strip():
        raise FormatProblem(f"empty {what}")
    return text


def _hh_pair(transcript: str, system: bool = False) -> tuple[str, str]:
    prompt, answer = split_hh(transcript, system)
    return prompt, _response(answer, "completion")


def _prompt_text(prompt: Any) -> str:
    """A prompt as text: a string as written; TRL's conversational prompt (messages ending with a user turn) as
    its HH transcript up to the open "\n\nAssistant:" (rendered with the model's chat template later)."""
    if isinstance(prompt, str):
        return prompt
    turns = _message_turns([*prompt, {"role": "assistant", "content": "x"}])[:-1]
    if turns[-1][0] != "user":
        raise FormatProblem("conversational prompt does not end with a user turn")
    return render_hh((r, f" {c}" if c and r != "system" else c) for r, c in turns) + ASSISTANT


def _answer_text(answer: Any, what: str) -> str:
    """An answer as text: a string as written; TRL's conversational answer ([one assistant message]) as the text
    after an HH "\n\nAssistant:" tag (one space, then the content)."""
    if isinstance(answer, str):
        return _response(answer, what)
    if (
        not isinstance(answer, (list, tuple))
        or len(answer) != 1
        or not isinstance(answer[0], dict)
        or answer[0].get("role") != "assistant"
        or not isinstance(answer[0].get("content"), str)
    ):
        raise FormatProblem(f"conversational {what} is not one assistant message")
    return " " + _response(answer[0]["content"], what)


def _preference(prompt: Any, chosen: Any, rejected: Any) -> dict[str, str]:
    prompt = _prompt_text(prompt)
    chosen = _answer_text(chosen, "chosen response")
    rejected = _answer_text(rejected, "rejected response")
    if chosen == rejected:
        raise FormatProblem("chosen and rejected are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _split_conversation(messages: Any, what: str) -> tuple[str, str]:
    """A whole conversation (TRL's implicit-prompt preference) -> (prompt text, final answer text)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise FormatProblem(f"{what} is not a list of messages")
    return _prompt_text(list(messages[:-1])), _answer_text(list(messages[-1:]), f"{what} response")


def _implicit_preference(chosen: Any, rejected: Any) -> dict[str, str]:
    (prompt, good), (other, bad) = (
        _split_conversation(chosen, "chosen"),
        _split_conversation(rejected, "rejected"),
    )
    if prompt != other:
        raise FormatProblem("chosen and rejected conversations do not share the prompt")
    return _preference(prompt, good, bad)


def _hh_preference(chosen: str, rejected: str) -> dict[str, str]:
    pairs = []
    for name, transcript in (("chosen", chosen), ("rejected", rejected)):
        try:
            pairs.append(split_hh(transcript))
        except FormatProblem as e:
            raise FormatProblem(f"{name}: {e}") from None
    (prompt, good), (other_prompt, bad) = pairs
    if prompt != other_prompt:
        raise FormatProblem("chosen and rejected transcripts do not share the prompt")
    return _preference(prompt, good, bad)


def _hh_text(transcript: str) -> dict[str, Any]:
    _hh_pair(transcript)
    return {"text": transcript}


def _text(text: str) -> dict[str, Any]:
    return {"text": _response(text, "text")}


def _pc(prompt: Any, completion: Any) -> dict[str, Any]:
    return {"prompt": _prompt_text(prompt), "completion": _answer_text(completion, "completion")}


def _pc_text(prompt: Any, completion: Any) -> dict[str, Any]:
    return {"text": _prompt_text(prompt) + _answer_text(completion, "completion")}


def _implicit_pc(chosen: Any) -> dict[str, Any]:
    prompt, answer = _split_conversation(chosen, "chosen")
    return {"prompt": prompt, "completion": answer}


def _hh_messages(transcript: str) -> dict[str, Any]:
    _hh_pair(transcript)
    return {"messages": hh_to_messages(transcript)}


def _messages_pc(messages: Any) -> dict[str, Any]:
    return _pc(*_hh_pair(messages_to_hh(messages), system=True))


def _messages(messages: Any) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in _message_turns(messages)]}


_TRANSCRIPT = None  # marks hh conversions that read one transcript column, "chosen" or "text"
_CONVERSIONS: dict[tuple[str, str], tuple[tuple[str, ...] | None, Callable[..., dict[str, Any]]]] = {
    ("hh", "text"): (_TRANSCRIPT, _hh_text),
    ("hh", "prompt_completion"): (_TRANSCRIPT, lambda t: _pc(*_hh_pair(t))),
    ("hh", "preference"): (("chosen", "rejected"), _hh_preference),
    ("hh", "messages"): (_TRANSCRIPT, _hh_messages),
    ("prompt_completion", "text"): (("prompt", "completion"), _pc_text),
    ("prompt_completion", "prompt_completion"): (("prompt", "completion"), _pc),
    ("preference", "preference"): (("prompt", "chosen", "rejected"), _preference),
    ("preference", "prompt_completion"): (("prompt", "chosen"), _pc),
    ("messages", "text"): (("messages",), lambda m: {"text": "".join(_hh_pair(messages_to_hh(m), True))}),
    ("messages", "prompt_completion"): (("messages",), _messages_pc),
    ("messages", "messages"): (("messages",), _messages),
    ("text", "text"): (("text",), _text),
}
# data.format: the formats rows can come in (data.on_malformed: what a malformed row does)
ON_MALFORMED = ("error", "skip")
_SOURCE_COLUMNS = {
    "hh": ("chosen", "rejected", "text"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "messages": ("messages",),
    "text": ("text",),
}
SOURCE_FORMATS = tuple(_SOURCE_COLUMNS)
_STRING = datasets.Value("string")
_FEATURES = {
    "text": datasets.Features({"text": _STRING}),
    "prompt_completion": datasets.Features({"prompt": _STRING, "completion": _STRING}),
    "preference": datasets.Features({"prompt": _STRING, "chosen": _STRING, "rejected": _STRING}),
    "messages": datasets.Features({"messages": datasets.List({"role": _STRING, "content": _STRING})}),
}


# TRL's implicit-prompt preference rows: chosen and rejected are whole conversations, no prompt column.
_IMPLICIT = {"preference": _implicit_preference, "prompt_completion": _implicit_pc}


def _input_columns(
    ds: datasets.Dataset, source_format: str, target: str, source: str
) -> tuple[tuple[str, ...], Callable[..., dict[str, Any]]]:
    """The columns a conversion reads and the converter; a missing column is a dataset-level error, not a
    malformed row."""
    present = ds.column_names
    wanted, convert = _CONVERSIONS[source_format, target]
    if source_format == "preference" and "prompt" not in present and {"chosen", "rejected"} <= set(present):
        if target in _IMPLICIT and ds.num_rows and isinstance(ds[0]["chosen"], list):
            return (("chosen", "rejected") if target == "preference" else ("chosen",)), _IMPLICIT[target]
    if wanted is _TRANSCRIPT:
        found = [c for c in ("chosen", "text") if c in present]
        if not found:
            raise ValueError(
                f"{source}: format 'hh' needs a 'chosen' or 'text' column; columns present: {present}"
            )
        return (found[0],), convert
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(
            f"{source}: format {source_format!r} needs column(s) {missing}; columns present: {present}"
        )
    return wanted, convert


def _check_values(columns: Sequence[str], values: Sequence[Any]) -> None:
    for column, value in zip(columns, values, strict=True):
        if value is None:
            raise FormatProblem(f"None in column {column!r}")
        if not isinstance(value, (str, list)):
            raise FormatProblem(f"column {column!r} is neither a string nor a list of messages")
        if isinstance(value, list) and column == "text":
            raise FormatProblem("column 'text' is not a string")


def _lf(value: Any) -> Any:
    """CRLF (Windows) line endings as \\n, in a string or in the contents of a message list."""
    if isinstance(value, str):
        return value.replace("\r\n", "\n")
    if isinstance(value, list):
        return [
            {**m, "content": _lf(m["content"])} if isinstance(m, dict) and "content" in m else m
            for m in value
        ]
    return value


def canonicalize(
    ds: datasets.Dataset, source_format: str, target: str, *, source: str, on_malformed: str = "error"
) -> tuple[datasets.Dataset, SkipReport]:
    """Convert ds from source_format to canonical target rows; other columns pass through untouched."""
    if on_malformed not in ON_MALFORMED:
        raise ValueError(f"on_malformed must be 'error' or 'skip', got {on_malformed!r}")
    if (source_format, target) not in _CONVERSIONS:
        supported = ", ".join(f"{s} -> {t}" for s, t in _CONVERSIONS)
        raise ValueError(f"cannot convert {source_format!r} rows to {target!r}; supported: {supported}")
    columns, convert = _input_columns(ds, source_format, target, source)
    data = ds.select_columns(list(columns)).to_dict()
    out: dict[str, list[Any]] = {name: [] for name in _FEATURES[target]}
    kept, report = [], SkipReport(source=source, rows=ds.num_rows)
    crlf = 0
    for i, values in enumerate(zip(*(data[c] for c in columns), strict=True)):
        try:
            _check_values(columns, values)
            normalised = [_lf(v) for v in values]  # "\r\n\r\nHuman:" would not be recognised as a turn
            crlf += normalised != list(values)
            row = convert(*normalised)
        except FormatProblem as e:
            if on_malformed == "error":
                raise MalformedRowError(source, i, str(e)) from None
            report.add(i, str(e))
            continue
        kept.append(i)
        for name, value in row.items():
            out[name].append(value)
    # Arrow tables built directly: Dataset.from_dict(features=...) encodes row by row, 3x slower on 100k rows.
    table = pa.Table.from_pydict(out, schema=_FEATURES[target].arrow_schema)
    features = dict(_FEATURES[target])
    extras = [c for c in ds.column_names if c not in _SOURCE_COLUMNS[source_format] and c not in out]
    if extras:
        rest = ds.select_columns(extras)
        taken = rest.with_format("arrow")[kept]  # honours any indices mapping (shuffle, select) ds carries
        for name in extras:
            table = table.append_column(name, taken[name])
            features[name] = rest.features[name]
    result = datasets.Dataset(table, info=datasets.DatasetInfo(features=datasets.Features(features)))
    report.kept = kept
    if crlf:
        log.info("%s: %d of %d rows had CRLF (Windows) line endings, read as \\n", source, crlf, ds.num_rows)
    if report.total:
        log.warning(report.summary())
    return result, report
