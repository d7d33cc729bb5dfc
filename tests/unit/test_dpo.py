"""stage=dpo's pieces: our tokenization of pairs, and TRL's DPO / IPO loss on one batch against the formulas
computed here from the two models' log-probs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from trl import DPOConfig

from alignlab.data.examples import LengthReport, prompt_ids, sequence_ids
from alignlab.recipes.dpo import PretokenizedDPOTrainer, pair_examples
from alignlab.stage_checks import dpo_loss_terms

PAIRS = [
    {"prompt": "Human : how ? Assistant :", "chosen": " sure yes .", "rejected": " no"},
    {"prompt": "Human : hi Assistant :", "chosen": " hello", "rejected": " no no no ."},
]


def test_pairs_are_the_prompt_then_each_answer_with_its_eos(tokenizer):
    report = LengthReport(max_length=10)  # the two pairs' longest answers: 10 tokens with the prompt and EOS
    long = {"prompt": "a b c d", "chosen": " a b c d a b", "rejected": " a"}  # 11
    ds = pair_examples([*PAIRS, long], tokenizer, report)
    assert len(ds) == 2 and report.too_long == 1  # the long pair is dropped, not truncated
    for ex, r in zip(ds, PAIRS, strict=False):
        assert ex["prompt_ids"] == prompt_ids(tokenizer, r["prompt"])
        assert ex["prompt_ids"] + ex["chosen_ids"] == sequence_ids(tokenizer, r["prompt"], r["chosen"])
        assert ex["chosen_ids"][-1] == ex["rejected_ids"][-1] == tokenizer.eos_token_id


def answer_logps(model, prompt: list[int], answer: list[int]) -> tuple[float, int]:
    """(sum of log p(answer token | everything before it), answer length), by hand."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    picked = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), torch.tensor(answer)]
    return picked.sum().item(), len(answer)


@pytest.mark.parametrize(("loss", "sft_weight"), [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.7)])
def test_trl_loss_is_dpo_and_ipo_by_hand(tokenizer, tiny_lm, tmp_path, loss, sft_weight):
    beta = 0.5
    reference = copy.deepcopy(tiny_lm)
    with torch.no_grad():  # a reference that differs from the policy, so the log-ratios are not 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = pair_examples(PAIRS, tokenizer, LengthReport(64))
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        **dpo_loss_terms(loss, sft_weight),  # what stage=dpo passes
        max_length=None,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        disable_dropout=True,
    )
    trainer = PretokenizedDPOTrainer(
        model=tiny_lm, ref_model=reference, args=args, train_dataset=ds, processing_class=tokenizer
    )
    batch = trainer.data_collator(list(ds))
    tiny_lm.eval()
    with torch.no_grad():
        got = trainer.compute_loss(tiny_lm, batch).item()

    losses, chosen_logp, chosen_tokens = [], 0.0, 0
    for ex in ds:
        (pc, nc), (pr, nr) = (
            answer_logps(tiny_lm, ex["prompt_ids"], ex[k]) for k in ("chosen_ids", "rejected_ids")
        )
        (rc, _), (rr, _) = (
            answer_logps(reference, ex["prompt_ids"], ex[k]) for k in ("chosen_ids", "rejected_ids")
        )
        h = (pc - rc) - (pr - rr)
        chosen_logp, chosen_tokens = chosen_logp + pc, chosen_tokens + nc
        if loss == "sigmoid":  # Rafailov et al. eq. 7
            losses.append(-math.log(1 / (1 + math.exp(-beta * h))))
        else:  # Azar et al. eq. 17, per answer token (TRL's normalisation)
            losses.append(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2)
    # RPO (Pang et al. 2024): + sft_weight x the chosen answers' mean token NLL over the batch
    expected = sum(losses) / len(losses) + sft_weight * -chosen_logp / chosen_tokens
    assert got == pytest.approx(expected, rel=1e-4)
    assert losses[0] != losses[1]  # two different pairs: the mean is not one of them by accident
