"""Text loading, document packing and the one ptx held-out rule shared by stage=ppo and stage=eval."""

from __future__ import annotations

import json

from alignlab.data.text_blocks import load_ptx_texts, load_texts, pack_texts


def write_texts(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_pack_texts_keeps_documents_whole_with_eos(tokenizer):
    texts = ["Human : hi", "a b c d", "yes"]
    packed = pack_texts(texts, tokenizer, 8)
    eos = tokenizer.eos_token_id
    real = [packed.tokens[b, : packed.lengths[b]].tolist() for b in range(len(packed))]
    assert sum(row.count(eos) for row in real) == 3  # one EOS per document
    assert sum(packed.lengths.tolist()) == sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)
    assert packed.truncated == 0


def test_load_texts_reads_a_text_file(tmp_path):
    path = write_texts(tmp_path / "t.jsonl", ["one", "two", "three"])
    assert load_texts(str(path), "text", "train", on_malformed="error", max_rows=None) == [
        "one",
        "two",
        "three",
    ]
    assert load_texts(str(path), "text", "train", on_malformed="error", max_rows=2) == ["one", "two"]


def test_ptx_held_out_is_the_first_tenth_at_least_one(tmp_path):
    texts = [f"doc {i}" for i in range(25)]
    ptx = load_ptx_texts(str(write_texts(tmp_path / "p.jsonl", texts)), None, on_malformed="error")
    assert ptx.held_out == texts[:2] and ptx.train == texts[2:]  # 25 // 10 = 2, in file order
    assert ptx.source == str(tmp_path / "p.jsonl")
    few = load_ptx_texts(str(write_texts(tmp_path / "few.jsonl", texts[:5])), None, on_malformed="error")
    assert few.held_out == texts[:1] and few.train == texts[1:5]


def test_ptx_source_else_tinyhh_ptx_file_else_none(tmp_path):
    write_texts(tmp_path / "ptx.jsonl", ["tiny"] * 10)
    own = write_texts(tmp_path / "own.jsonl", ["mine"] * 10)
    assert load_ptx_texts(None, tmp_path, on_malformed="error").source == str(tmp_path / "ptx.jsonl")
    assert load_ptx_texts(str(own), tmp_path, on_malformed="error").held_out == ["mine"]
    assert load_ptx_texts(None, None, on_malformed="error") is None
