"""stage=eval's alignment tax on the user's own models: each model's pretraining loss is measured on the user's text
(stage.ptx_source) tokenized with that model's OWN tokenizer, never with another model's token ids; without such
text the column is left out, logged and noted in report.md."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from alignlab import models
from alignlab.config import Config, EvalConfig
from alignlab.evaluation.lm_loss import AlignmentTax, tokenizer_key
from alignlab.recipes.eval import append_notes, ptx_texts
from tests.conftest import alignlab
from tests.zoo.families import build, corpus

DEFAULT_SYSTEMS = tuple(EvalConfig().systems)  # stage=eval's default systems, removed below


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """gpt2 (500 tokens, no BOS) and llama (600 tokens, BOS added): llama's ids overflow gpt2's embeddings."""
    root = tmp_path_factory.mktemp("zoo")
    return {f: build(f, root / f) for f in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def texts():
    return corpus(60, seed=1)


def reference_loss(model_dir, blocks) -> float:
    """The same quantity through transformers' own LM loss: mean NLL over every non-pad target."""
    model = models.load_causal_lm(str(model_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, length in zip(blocks.tokens, blocks.lengths, strict=True):
            x = tokens[:length].unsqueeze(0)
            total += model(input_ids=x, labels=x).loss.item() * (int(length) - 1)
            count += int(length) - 1
    return total / count


def test_each_model_is_measured_on_its_own_token_ids(zoo, texts, tmp_path):
    tax = AlignmentTax(texts, n_blocks=3, device="cpu")
    losses = {}
    for family, path in zoo.items():
        loss, why = tax(str(path))
        assert why is None
        tok = models.load_tokenizer(str(path))
        blocks = tax.blocks_for(tok, 256)
        # the blocks are this tokenizer's ids of the text: they decode back to the documents
        decoded = tok.decode(blocks.tokens[0][: blocks.lengths[0]], skip_special_tokens=True)
        assert any(t.strip()[:20] in decoded for t in texts)
        assert int(blocks.tokens.max()) < len(tok)
        losses[family] = loss
        # blocks hold several documents each, so the 3 blocks of one tokenizer differ from the other's
        assert loss == pytest.approx(reference_loss(path, blocks), rel=1e-4)
        # a random-init model predicts about uniformly over its own vocabulary
        assert abs(loss - math.log(len(tok))) < 0.5
    assert len(tax.blocks) == 2  # one tokenization per tokenizer
    # another model with the same tokenizer reuses the cached blocks
    twin = tmp_path / "gpt2_twin"
    shutil.copytree(zoo["gpt2"], twin)
    assert tax(str(twin)) == (pytest.approx(losses["gpt2"]), None) and len(tax.blocks) == 2


def test_tokenizer_key_tells_tokenizers_apart(zoo):
    a, b = (models.load_tokenizer(str(p)) for p in zoo.values())
    assert tokenizer_key(a) != tokenizer_key(b)
    assert tokenizer_key(a) == tokenizer_key(models.load_tokenizer(str(zoo["gpt2"])))


def test_ids_beyond_the_embeddings_leave_the_model_out(zoo, texts, tmp_path):
    # a model whose saved tokenizer has more tokens than its embedding table: no number rather than an IndexError
    odd = tmp_path / "odd"
    shutil.copytree(zoo["gpt2"], odd)
    shutil.copy(zoo["llama"] / "tokenizer.json", odd / "tokenizer.json")
    shutil.copy(zoo["llama"] / "tokenizer_config.json", odd / "tokenizer_config.json")
    loss, why = AlignmentTax(texts, 3, "cpu")(str(odd))
    assert loss is None and "beyond the model's 500 embeddings" in why


def test_no_pretraining_text_means_no_column_and_a_note(tmp_path):
    cfg = OmegaConf.merge(
        OmegaConf.structured(Config),
        {
            "stage": {"ptx_blocks": 8, "ptx_source": None},
            "data": {"source": "x.jsonl", "on_malformed": "error"},
        },
    )
    texts, why = ptx_texts(cfg, None)
    assert texts is None and "stage.ptx_source" in why
    report = tmp_path / "report.md"
    report.write_text("# Evaluation report\n\ntable\n")
    append_notes(report, [f"Pretraining loss not measured: {why}."])
    assert report.read_text().endswith(f"## Notes\n\n- Pretraining loss not measured: {why}.\n")


def test_two_families_in_one_eval(zoo, texts, tmp_path):
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question: {w}?\nAnswer:"}) + "\n" for w in "abcd"))
    common = [
        "stage=eval",
        f"model.name_or_path={zoo['gpt2']}",
        "data=local",
        f"data.source={prompts}",
        f"stage.prompts={prompts}",
        "stage.judge=rm",
        f"reward.reward_model={zoo['gpt2']}",  # a score head on the zoo model (random: values do not matter)
        f"stage.reference={zoo['gpt2']}",
        "stage.max_new_tokens=4",
        "stage.ptx_blocks=3",
        *[f"~stage.systems.{name}" for name in DEFAULT_SYSTEMS],
        f"+stage.systems.gpt2.model={zoo['gpt2']}",
        f"+stage.systems.llama.model={zoo['llama']}",
        "stage.baseline=gpt2",
        "logger.progress=false",
    ]
    out = tmp_path / "eval"
    alignlab(*common, f"stage.ptx_source={ptx}", f"run_dir={out}", cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    tax = AlignmentTax(texts[: len(texts) // 10], 3, "cpu")  # the first tenth: PPO's held-out split
    for name in ("gpt2", "llama"):
        assert results["systems"][name]["ptx_loss"] == pytest.approx(tax(str(zoo[name]))[0], rel=1e-4)
    assert results["systems"]["llama"]["kl"] is None  # its tokenizer is not the reference's
    assert results["systems"]["gpt2"]["kl"] is not None
    assert any("different tokenizers do not compare" in n for n in results["notes"])
    assert "## Notes" in (out / "report.md").read_text()

    # no pretraining text (not TinyHH, no stage.ptx_source): the column is left out, and report.md says why
    out = tmp_path / "eval_without"
    proc = alignlab(*common, f"run_dir={out}", cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert all(m["ptx_loss"] is None for m in results["systems"].values())
    assert "pretraining loss (alignment tax) not measured" in proc.stdout + proc.stderr
    assert "Pretraining loss not measured: no pretraining text" in (out / "report.md").read_text()
