"""scripts/bench/common.py: the docs section writer and the FLOP accounting the benchmark tables rest on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
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


def test_flops_per_token_median_rate_and_dtype_overrides(tokenizer):
    lm = LlamaForCausalLM(tiny_config(tokenizer))  # 2,944 matmul parameters, 1 layer of width 16 (above)
    # sequences of 3 and 5 tokens: 6 * 2944 * 8 + 6 * 1 * 16 * (9 + 25) = 141,312 + 3,264 over 8 tokens
    assert common.flops_per_token(lm, [3, 5]) == pytest.approx((141_312 + 3_264) / 8)
    rows = [
        {"perf/tokens_per_s": 1.0},
        {"loss": 2.0},
        {"perf/tokens_per_s": 30.0},
        {"perf/tokens_per_s": 10.0},
    ]
    assert common.median_tokens_per_s(rows, "sft") == 20.0  # the first interval (warm-up) left out
    with pytest.raises(RuntimeError, match="sft: too few log intervals"):
        common.median_tokens_per_s(rows[:2], "sft")
    assert common.dtype_overrides("float32") == []
    assert common.dtype_overrides("bfloat16") == ["model.dtype=bfloat16"]


def test_an_empty_section_key_is_refused_and_the_doc_untouched(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n")
    with pytest.raises(ValueError, match="empty section key"):
        common.write_section("", "Scale", "| x |", doc)
    assert doc.read_text() == "# Benchmarks\n"


def test_publish_with_an_empty_key_prints_only(monkeypatch, capsys):
    def write(*args):
        raise AssertionError(f"publish wrote a section: {args}")

    monkeypatch.setattr(common, "write_section", write)
    common.publish("", "Scale", ["| x |"])
    assert capsys.readouterr().out == "| x |\n"


def test_scale_from_json_with_an_empty_section_only_prints(tmp_path):
    # `--section=''` is print only, also when re-rendering a saved sweep: no docs block, no plots. The scripts run
    # from a copy (their docs/ is the copy's), so a regression cannot write into the repository's docs.
    shutil.copytree(ROOT / "scripts" / "bench", tmp_path / "scripts" / "bench")
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "bench_scale.json", tmp_path / "docs")
    proc = subprocess.run(
        [sys.executable, "scripts/bench/bench_scale.py", "--from-json", "docs/bench_scale.json", "--section="],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 39.0M |" in proc.stdout and "![" not in proc.stdout
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["bench_scale.json"]


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


def test_widen_llama_computes_the_trained_function_at_the_larger_cost(tokenizer):
    torch.manual_seed(1)
    cfg = tiny_config(tokenizer)
    cfg.num_hidden_layers = 2
    lm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # trained-looking norms, not all ones
        for p in lm.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    wide = common.widen_llama(lm, width=48, layers=3, intermediate=80)
    assert (wide.config.hidden_size, wide.config.num_hidden_layers, wide.config.num_attention_heads) == (
        48,
        3,
        6,
    )
    assert common.matmul_params(wide) > 5 * common.matmul_params(lm)
    ids = torch.tensor([[1, 5, 9, 4, 7, 12, 3], [2, 8, 8, 6, 5, 11, 10]])
    with torch.no_grad():
        a, b = lm(input_ids=ids).logits, wide(input_ids=ids).logits
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        # the extra residual dimensions stay exactly 0 through every layer
        hidden = wide(input_ids=ids, output_hidden_states=True).hidden_states
        assert all(h[..., 16:].abs().max() == 0 for h in hidden)
        # and the KV-cached path decodes the same tokens
        kw = {"do_sample": False, "max_new_tokens": 6, "pad_token_id": tokenizer.pad_token_id}
        assert torch.equal(lm.generate(ids[:1], **kw), wide.generate(ids[:1], **kw))
    with pytest.raises(ValueError, match="multiple of head_dim"):
        common.widen_llama(lm, width=50, layers=3)


def test_widen_llama_keeps_a_reward_models_scores(tokenizer):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(2)
    cfg = tiny_config(tokenizer)
    cfg.num_labels, cfg.pad_token_id = 1, tokenizer.pad_token_id
    rm = LlamaForSequenceClassification(cfg).eval()
    wide = common.widen_llama(rm, width=32, layers=2, intermediate=48)
    assert isinstance(wide, LlamaForSequenceClassification) and wide.config.num_labels == 1
    assert wide.config.pad_token_id == tokenizer.pad_token_id
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[1, 5, 9, 4, 7, pad, pad], [2, 8, 8, 6, 5, 11, 10]])
    with torch.no_grad():
        torch.testing.assert_close(wide(input_ids=ids).logits, rm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="intermediate"):
        common.widen_llama(rm, width=32, layers=2, intermediate=8)
