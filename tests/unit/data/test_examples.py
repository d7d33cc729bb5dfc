"""SFT examples: answer-only labels (prompt, earlier turns and pads -100; the final EOS labelled even with pad == eos)."""

from __future__ import annotations

import pytest
import torch
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from alignlab.data.examples import LengthReport, sequence_ids, sft_example, sft_segments
from tests.unit.conftest import tiny_config, word_tokenizer

PROMPT = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how ?\n\nAssistant:"


def test_segments_last_turn_and_all_turns():
    assert sft_segments(PROMPT, " like this .") == [(PROMPT, False), (" like this .", True)]
    pieces = sft_segments(PROMPT, " like this .", "all_assistant_turns")
    assert [t for t, trained in pieces if trained] == [" hello", " like this ."]
    assert "".join(t for t, _ in pieces) == PROMPT + " like this ."
    # not an HH transcript: one masked prompt piece
    assert sft_segments("Q: hi", " a", "all_assistant_turns") == [("Q: hi", False), (" a", True)]
    with pytest.raises(ValueError, match="train_on"):
        sft_segments(PROMPT, " a", "everything")


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_mask_prompt_and_keep_eos(pad_is_eos):
    tok = word_tokenizer(pad_is_eos)
    ex = sft_example(tok, PROMPT, " like this .")
    ids, mask = ex["input_ids"], ex["completion_mask"]
    answer = tok(" like this .", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1  # the EOS that ends the answer trains
    assert ids[-1 - len(answer) : -1] == answer and mask[-1 - len(answer) :] == [1] * (len(answer) + 1)
    assert set(mask[: -1 - len(answer)]) == {0}  # every prompt token (both earlier turns) masked
    multi = sft_example(tok, PROMPT, " like this .", "all_assistant_turns")
    assert multi["input_ids"] == ids
    hello = tok("hello", add_special_tokens=False)["input_ids"][0]
    assert multi["completion_mask"][ids.index(hello)] == 1 and sum(multi["completion_mask"]) == sum(mask) + 1


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_sft_trainer_labels_and_loss(tmp_path, pad_is_eos):
    """Through TRL's own preparation and collator: -100 on prompt and pads, EOS labelled, loss = answer NLL."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    tok = word_tokenizer(pad_is_eos)
    rows = [
        sft_example(tok, PROMPT, " like this ."),
        sft_example(tok, "\n\nHuman: hi\n\nAssistant:", " sure ."),
    ]
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tok))
    args = SFTConfig(
        output_dir=str(tmp_path),
        completion_only_loss=True,
        max_length=64,
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    prepared = [trainer.train_dataset[i] for i in range(2)]
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(prepared)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        labels = batch["labels"][i]
        expected = [t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"], strict=True)]
        assert labels[:n].tolist() == expected
        assert (labels[n:] == -100).all()  # padding never trains
        assert labels[n - 1] == tok.eos_token_id
    # The model's loss is the mean NLL over exactly the labelled tokens.
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    target = batch["labels"][:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert torch.allclose(out.loss, nll, atol=1e-5)


def test_sequence_ids_end_with_eos(tokenizer):
    ids = sequence_ids(tokenizer, "\n\nHuman: hi\n\nAssistant:", " sure .")
    assert ids[0] == tokenizer.bos_token_id or tokenizer.bos_token_id not in ids[1:]
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_length_report_counts_and_names_rows():
    report = LengthReport(max_length=5)
    flags = [report.add(i, n) for i, n in enumerate([3, 7, 5, 9])]
    assert flags == [False, True, False, True]
    assert (report.rows, report.too_long, report.longest, report.examples) == (4, 2, 9, [1, 3])
    assert "2 of 4 rows" in report.summary("x.jsonl", "dropped") and "stage.max_length=5" in report.summary(
        "x", "y"
    )
