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
    # tiny_config by hand: vocab 21 (4 specials + 17 words), hidden 16, one layer, MLP 32. Multiplying per token:
    # q, k, v, o 4 * 16 * 16 = 1024; gate, up, down 3 * 16 * 32 = 1536; the layer's two norms and the final norm
    # 3 * 16 = 48; the LM head 21 * 16 = 336. The embedding lookup (another 336) multiplies nothing.
    assert len(tokenizer) == 21
    lm = LlamaForCausalLM(tiny_config(tokenizer))
    assert common.matmul_params(lm) == 2944
    # tied: the one shared matrix is counted once, as the head
    tied = LlamaForCausalLM(tiny_config(tokenizer, tie_word_embeddings=True))
    assert common.matmul_params(tied) == 2944
    # N = 1000 over two sequences of 3 and 5 tokens, 2 layers of width 16, by hand: 6N per token is
    # 6 * 1000 * 8 = 48,000; causal attention 6 * 2 * 16 * (3^2 + 5^2) = 6,528
    assert common.training_flops(1000, 2, 16, [3, 5]) == 54_528
