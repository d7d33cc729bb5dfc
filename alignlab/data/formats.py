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

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TAG_OF_ROLE = {"user": HUMAN, "assistant": ASSISTANT}
_ROLE_OF_TAG = {HUMAN: "user", ASSISTANT: "assistant"}
_TAGS = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")
_ROLES = ("user", "assistant", "system")

log = logging.getLogger("alignlab.data")


class FormatProblem(ValueError):
    """A row that does not fit its format; str(error) is a short description shared by all such rows."""


class MalformedRowError(ValueError):
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


def parse_hh(text: str) -> list[tuple[str, str]]:
    """Split an HH transcript into (role, content) turns; content keeps its leading space."""
    pieces = _TAGS.split(text)
    if pieces[0] or len(pieces) == 1 or pieces[1] != HUMAN:
        raise FormatProblem(r'transcript does not start with "\n\nHuman:"')
    turns = [(_ROLE_OF_TAG[tag], content) for tag, content in zip(pieces[1::2], pieces[2::2], strict=True)]
    _check_turns(turns)
    return turns


def render_hh(turns: Iterable[tuple[str, str]]) -> str:
    """Join (role, content) turns into an HH transcript; the exact inverse of parse_hh."""
    try:
        return "".join(_TAG_OF_ROLE[role] + content for role, content in turns)
    except KeyError as e:
        raise FormatProblem(f"{e.args[0]} turns have no HH rendering") from None


def split_hh(text: str) -> tuple[str, str]:
    """Split an HH transcript into (prompt up to and including the last "\\n\\nAssistant:", final answer)."""
    role, answer = parse_hh(text)[-1]
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
    return render_hh((role, f" {content}" if content else "") for role, content in turns)


def hh_to_messages(text: str) -> list[dict[str, str]]:
    """Parse an HH transcript into chat messages, dropping the one space after each role tag.

    messages_to_hh puts that space back, so the round trip is exact for hh-rlhf style transcripts.
    """
    return [{"role": role, "content": c[1:] if c.startswith(" ") else c} for role, c in parse_hh(text)]


# ---------------------------------------------------------------- row converters


def _response(text: str, what: str) -> str:
    if not text.strip():
        raise FormatProblem(f"empty {what}")
    return text


def _hh_pair(transcript: str) -> tuple[str, str]:
    prompt, answer = split_hh(transcript)
    return prompt, _response(answer, "completion")


def _preference(prompt: str, chosen: str, rejected: str) -> dict[str, str]:
    _response(chosen, "chosen response")
    _response(rejected, "rejected response")
    if chosen == rejected:
        raise FormatProblem("chosen and rejected are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


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


def _pc(prompt: str, completion: str) -> dict[str, Any]:
    return {"prompt": prompt, "completion": _response(completion, "completion")}


def _pc_text(prompt: str, completion: str) -> dict[str, Any]:
    return {"text": prompt + _response(completion, "completion")}


def _hh_messages(transcript: str) -> dict[str, Any]:
    _hh_pair(transcript)
    return {"messages": hh_to_messages(transcript)}


def _messages_pc(messages: Any) -> dict[str, Any]:
    return _pc(*_hh_pair(messages_to_hh(messages)))


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
    ("messages", "text"): (("messages",), lambda m: _hh_text(messages_to_hh(m))),
    ("messages", "prompt_completion"): (("messages",), _messages_pc),
    ("messages", "messages"): (("messages",), _messages),
    ("text", "text"): (("text",), _text),
}
_SOURCE_COLUMNS = {
    "hh": ("chosen", "rejected", "text"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "messages": ("messages",),
    "text": ("text",),
}
_STRING = datasets.Value("string")
_FEATURES = {
    "text": datasets.Features({"text": _STRING}),
    "prompt_completion": datasets.Features({"prompt": _STRING, "completion": _STRING}),
    "preference": datasets.Features({"prompt": _STRING, "chosen": _STRING, "rejected": _STRING}),
    "messages": datasets.Features({"messages": datasets.List({"role": _STRING, "content": _STRING})}),
}


def _input_columns(ds: datasets.Dataset, source_format: str, target: str, source: str) -> tuple[str, ...]:
    """The columns a conversion reads; a missing one is a dataset-level error, not a malformed row."""
    present = ds.column_names
    wanted = _CONVERSIONS[source_format, target][0]
    if wanted is _TRANSCRIPT:
        found = [c for c in ("chosen", "text") if c in present]
        if not found:
            raise ValueError(
                f"{source}: format 'hh' needs a 'chosen' or 'text' column; columns present: {present}"
            )
        return (found[0],)
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(
            f"{source}: format {source_format!r} needs column(s) {missing}; columns present: {present}"
        )
    return wanted


def _check_values(columns: Sequence[str], values: Sequence[Any]) -> None:
    for column, value in zip(columns, values, strict=True):
        if value is None:
            raise FormatProblem(f"None in column {column!r}")
        if column != "messages" and not isinstance(value, str):
            raise FormatProblem(f"column {column!r} is not a string")


def canonicalize(
    ds: datasets.Dataset, source_format: str, target: str, *, source: str, on_malformed: str = "error"
) -> tuple[datasets.Dataset, SkipReport]:
    """Convert ds from source_format to canonical target rows; other columns pass through untouched."""
    if on_malformed not in ("error", "skip"):
        raise ValueError(f"on_malformed must be 'error' or 'skip', got {on_malformed!r}")
    if (source_format, target) not in _CONVERSIONS:
        supported = ", ".join(f"{s} -> {t}" for s, t in _CONVERSIONS)
        raise ValueError(f"cannot convert {source_format!r} rows to {target!r}; supported: {supported}")
    columns = _input_columns(ds, source_format, target, source)
    convert = _CONVERSIONS[source_format, target][1]
    data = ds.select_columns(list(columns)).to_dict()
    out: dict[str, list[Any]] = {name: [] for name in _FEATURES[target]}
    kept, report = [], SkipReport(source=source, rows=ds.num_rows)
    for i, values in enumerate(zip(*(data[c] for c in columns), strict=True)):
        try:
            _check_values(columns, values)
            row = convert(*values)
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
    if report.total:
        log.warning(report.summary())
    return result, report
