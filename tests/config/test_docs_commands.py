"""Every `python -m alignlab stage=...` command in README.md and docs/ composes: its overrides parse with Hydra's
grammar (quoting included) and name keys and values the config has. A broken command in the docs (an unquoted
list, a renamed key) fails here instead of on a user's machine."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.config.test_compose import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
FLAGS = {"--help", "-m", "--multirun"}  # Hydra's flags, not overrides
COMMAND = re.compile(r"python -m alignlab( [^`#\n]*)?")


def commands() -> list[tuple[str, list[str], bool]]:
    """(where, overrides, multirun) for every command line that names a stage (continuation lines joined)."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        variables = dict(re.findall(r'^(\w+)="([^"]*)"', path.read_text(), flags=re.M))  # M="model=..." lines
        for i, line in enumerate(lines):
            for m in COMMAND.finditer(line):
                cmd, j = m.group(0), i
                while cmd.rstrip().endswith("\\") and j + 1 < len(lines):
                    j += 1
                    cmd = cmd.rstrip()[:-1] + " " + lines[j].split("#")[0].strip().rstrip("`")
                for name, value in variables.items():
                    cmd = cmd.replace(f"${name}", value)
                tokens = shlex.split(cmd)[3:]
                if "(" in "".join(t[:1] for t in tokens):  # prose after the command: "(sets up .venv first)"
                    tokens = tokens[: next(k for k, t in enumerate(tokens) if t.startswith("("))]
                if "--cfg" in tokens:  # --cfg job: print the config
                    k = tokens.index("--cfg")
                    tokens = tokens[:k] + tokens[k + 2 :]
                stages = [t for t in tokens if t.startswith("stage=")]
                if not stages or re.search(r"[<|]", stages[0]):  # a placeholder: stage=<name>, stage=sft|rm
                    continue
                multirun = bool({"-m", "--multirun"} & set(tokens))
                found.append(
                    (f"{path.relative_to(ROOT)}:{i + 1}", [t for t in tokens if t not in FLAGS], multirun)
                )
    return found


COMMANDS = commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) > 100


@pytest.mark.parametrize("where,overrides,multirun", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_a_documented_command_composes(where, overrides, multirun):
    if multirun:  # a sweep: its first value of each swept key stands for the rest
        overrides = [re.sub(r"=([^\[\]'\",]+),[^\[\]]*$", r"=\1", o) for o in overrides]
    compose_cfg(*overrides)
