"""`python -m alignlab stage=<s> --help`: every stage.* key with its type, its value and its doc.

A field's doc is its comment in the schema's source (alignlab/config.py, alignlab/rain/stage_config.py): the comment
on its line, or the comment lines right above it; a field a subclass restates without a comment keeps its base
class's doc. conf/hydra/help/alignlab.yaml calls stage_help through the `alignlab_stage_help` resolver.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import io
import json
import textwrap
import tokenize
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

WIDTH = 110  # doc lines are wrapped to this many characters
SHORT = 70  # a list or dict value longer than this is shown by its keys or length (the whole value: "Config" below)


def field_docs(cls: type) -> dict[str, str]:
    """field name -> its doc, for a dataclass and the dataclasses it inherits from."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs |= _own_docs(klass)
    return docs


@functools.cache
def _own_docs(klass: type) -> dict[str, str]:
    """The docs of the fields written in klass's own body (nothing when its source is not available)."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        if doc := " ".join(above + own).replace(" # fmt: skip", ""):
            docs[node.target.id] = doc
    return docs


def type_name(t: Any) -> str:
    """How --help names a field's type: an Enum by its choices (k1 | k3), others as written (list[float])."""
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return " | ".join(str(m.value) for m in t)
    if typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(type_name(a) for a in typing.get_args(t))
    if t is type(None):
        return "null"
    if isinstance(t, type) and not typing.get_args(t):
        return t.__name__
    return str(t).replace("typing.", "")


def shown_value(node: DictConfig, key: str) -> str:
    value = OmegaConf.to_container(node, resolve=False)[key] if key in node else None
    if isinstance(value, enum.Enum):
        value = value.value
    text = json.dumps(value) if isinstance(value, str | list | dict) or value is None else str(value)
    if len(text) > SHORT and isinstance(value, dict):
        return "{" + ", ".join(map(str, value)) + "}"
    if len(text) > SHORT and isinstance(value, list):
        return f"[{len(value)} entries]"
    return text


def reading_order(cls: type) -> list[str]:
    """The field names, the class's own first (in its source order), then each base class's others."""
    names = [f.name for f in dataclasses.fields(cls)]
    own = [n for klass in cls.__mro__ for n in vars(klass).get("__annotations__", {}) if n in names]
    return list(dict.fromkeys(own))


def field_lines(cls: type, node: DictConfig, prefix: str) -> list[str]:
    """Two lines per field (nested dataclasses: their fields), prefix.key: type = value, then its doc."""
    docs, hints, out = field_docs(cls), typing.get_type_hints(cls), []
    for name in reading_order(cls):
        key, t = f"{prefix}.{name}", hints[name]
        if dataclasses.is_dataclass(t) and isinstance(node.get(name), DictConfig):
            out += field_lines(t, node[name], key)
            continue
        out.append(f"{key}: {type_name(t)} = {shown_value(node, name)}")
        doc = docs.get(name, "(no doc)")
        out += textwrap.wrap(doc, WIDTH, initial_indent="    ", subsequent_indent="    ")
    return out


def stage_help(_root_: DictConfig) -> str:
    """The stage.* block of --help for the composed config's stage ($ escaped for the help template)."""
    stage = _root_.get("stage")
    cls = OmegaConf.get_type(stage) if isinstance(stage, DictConfig | ListConfig) else None
    if cls is None or not dataclasses.is_dataclass(cls):
        return "(no stage= given)"
    return "\n".join(field_lines(cls, stage, "stage")).replace("$", "$$")
