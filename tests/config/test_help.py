"""`python -m alignlab stage=<s> --help` shows every stage.* key with its type, value and one doc; every field of the
schema has exactly one doc (its comment), none squeezed into a formatter-wrapped value."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

import pytest
from omegaconf import OmegaConf

from alignlab import config
from alignlab.config_help import field_docs, field_lines, stage_help
from alignlab.rain import stage_config
from alignlab.stages import STAGES
from tests.config.test_compose import compose_cfg
from tests.conftest import alignlab


def schema_classes() -> list[type]:
    """Every dataclass of the schema (groups, stages, their nested blocks and bases)."""
    found: set[type] = set()

    def visit(cls):
        for klass in cls.__mro__:
            if dataclasses.is_dataclass(klass) and klass not in found:
                found.add(klass)
                for t in typing.get_type_hints(klass).values():
                    if dataclasses.is_dataclass(t):
                        visit(t)

    visit(config.Config)
    for s in STAGES:
        visit(OmegaConf.get_type(compose_cfg(f"stage={s}").stage))
    return sorted(found, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", schema_classes(), ids=lambda c: c.__name__)
def test_every_field_has_a_doc(cls):
    docs = field_docs(cls)
    assert [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)] == []


@pytest.mark.parametrize("module", [config, stage_config], ids=lambda m: m.__name__)
def test_no_doc_is_squeezed_into_a_wrapped_value(module):
    # `x: T = (\n value  # doc\n)`, the formatter's wrapping of a long commented line: the doc goes above instead
    source = inspect.getsource(module)
    lines = source.splitlines()
    wrapped = [
        lines[node.lineno - 1].strip()
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.AnnAssign)
        and node.end_lineno > node.lineno
        and any("#" in line for line in lines[node.lineno : node.end_lineno])
    ]
    assert wrapped == []


def test_a_subclass_field_without_a_comment_keeps_its_base_doc():
    @dataclasses.dataclass
    class Base:
        lr: float = 0.1  # the base doc

    @dataclasses.dataclass
    class Sub(Base):
        lr: float = 0.2

    @dataclasses.dataclass
    class Own(Base):
        # its own doc, above
        lr: float = 0.3

    assert field_docs(Sub) == {"lr": "the base doc"} and field_docs(Own) == {"lr": "its own doc, above"}


def test_the_stage_block_shows_type_value_and_doc():
    lines = field_lines(config.PPOConfig, compose_cfg("stage=ppo", "stage.kl_coef=0.05").stage, "stage")
    i = lines.index('stage.kl_estimator: k1 | k3 = "k1"')
    assert lines[i + 1].startswith("    k1 = log pi - log pi_ref")
    assert "stage.kl_coef: float = 0.05" in lines  # the value this command line gives
    assert (
        "stage.lr: float = 1e-05" in lines and "stage.betas: list[float] = [0.9, 0.95]" in lines
    )  # inherited
    rain = field_lines(stage_config.RainConfig, compose_cfg("stage=rain").stage, "stage")
    assert 'stage.judge.turn_marker: str = "\\n\\nHuman:"' in rain  # nested blocks by their full key
    # the help template runs through string.Template: every $ of a value is escaped
    assert "$${stage_dir:sft}/model" in stage_help(compose_cfg("stage=ppo"))


def test_help_for_a_stage(tmp_path):
    out = alignlab("stage=ppo", "--help", cwd=tmp_path).stdout
    block = out[out.index("== The stage's keys") : out.index("== Config (")]
    assert 'stage.kl_estimator: k1 | k3 = "k1"\n    k1 = log pi - log pi_ref' in block
    assert (
        'stage.init_from: str = "${stage_dir:sft}/model"\n    policy and frozen reference: the SFT model'
        in block
    )
    assert block.count("\nstage.") == len(dataclasses.fields(config.PPOConfig))
    assert "(no doc)" not in block
    out = alignlab("stage=rejection_sampling", "--help", cwd=tmp_path).stdout
    assert "stage.finetune.train_on: last_turn | all_assistant_turns = " in out
    assert textwrap.dedent(out).count("stage.keep: all | last") == 1
