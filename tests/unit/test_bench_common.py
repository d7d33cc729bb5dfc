"""scripts/bench/common.py: the docs section writer and the FLOP accounting the benchmark tables rest on."""

from __future__ import annotations

import sys

from transformers import LlamaForCausalLM

from tests.conftest import ROOT
from tests.unit.conftest import tiny_config

sys.path.insert(0, str(ROOT / "scripts" / "bench"))
import common  # noqa: E402


def test_write_section_replaces_its_block_and_appends_new_ones(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## A\n\n<!-- a -->\nold\n<!-- /a -->\n\ntext after\n")
    common.write_section("a", "A", "new table", doc)
    common.write_section("b", "B title", "| x |", doc)
    common.write_section("b", "B title", "| y |", doc)
    text = doc.read_text()
    assert "<!-- a -->\nnew table\n<!-- /a -->\n\ntext after" in text and "old" not in text
    assert text.count("## B title") == 1 and "<!-- b -->\n| y |\n<!-- /b -->" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_flop_accounting(tokenizer):
    lm = LlamaForCausalLM(tiny_config(tokenizer))
    c = lm.config
    emb = c.vocab_size * c.hidden_size
    total = sum(p.numel() for p in lm.parameters())
    # the embedding lookup multiplies nothing; the LM head does (tied: the shared matrix counts once, as the head)
    assert common.matmul_params(lm) == total - emb
    tied = LlamaForCausalLM(tiny_config(tokenizer, tie_word_embeddings=True))
    assert common.matmul_params(tied) == sum(p.numel() for p in tied.parameters())
    assert common.training_flops(1000, 2, 16, [3, 5]) == 6 * 1000 * 8 + 6 * 2 * 16 * (9 + 25)
