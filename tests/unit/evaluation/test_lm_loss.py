"""The one LM-loss evaluator (pretrain's eval/loss, PPO's eval/ptx_loss, eval's ptx_loss) against hand values and
transformers' own causal-LM loss; sharding over ranks and the padding forwards that keep ranks in step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from alignlab.data.packing import Packed
from alignlab.data.text_blocks import pack_texts
from alignlab.evaluation.lm_loss import lm_eval_loss

PROBS = [0.1, 0.2, 0.3, 0.4]


class FixedDistribution(torch.nn.Module):
    """Predicts PROBS at every position, whatever the input: each target's NLL is -log PROBS[target]."""

    def forward(self, input_ids, use_cache=False):
        logits = torch.tensor(PROBS).log().expand(*input_ids.shape, len(PROBS))
        return SimpleNamespace(logits=logits)


# pad id 0; block 1 holds one token only (no target), position 0 is never a target
BLOCKS = Packed(torch.tensor([[3, 3, 2, 0], [1, 0, 0, 0], [2, 1, 3, 3]]), torch.tensor([3, 1, 4]), 0)
# targets: block 0 -> 3, 2; block 2 -> 1, 3, 3
HAND = -(math.log(0.4) + math.log(0.3) + math.log(0.2) + 2 * math.log(0.4)) / 5


@pytest.mark.parametrize("micro", [1, 2, 3, 8])
@pytest.mark.parametrize("token_sums", [False, True])
def test_hand_value_for_any_micro_batch_size(micro, token_sums):
    loss = lm_eval_loss(FixedDistribution(), BLOCKS, micro, "cpu", token_sums=token_sums)
    assert loss == pytest.approx(HAND, rel=1e-6)


def test_collective_on_one_process_is_the_same_number():
    # no process group: averaging over ranks is the identity
    assert lm_eval_loss(FixedDistribution(), BLOCKS, 2, "cpu", collective=True) == pytest.approx(
        HAND, rel=1e-6
    )


@pytest.fixture
def blocks(tokenizer):
    texts = ["Human : hi Assistant : hello", "Human : how ? Assistant : sure .", "a b c d", "yes", "no no no"]
    texts += ["Human : like this ? Assistant : no", "b c", "hello hello hi"]
    packed = pack_texts(texts, tokenizer, 12)
    assert len(packed) >= 3 and (packed.lengths < 12).any()  # some padding to ignore
    return packed


def transformers_loss(model, blocks: Packed) -> float:
    """transformers' own LM loss, block by block without padding, weighted by each block's target count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, length in zip(blocks.tokens, blocks.lengths, strict=True):
            x = tokens[:length].unsqueeze(0)
            total += model(input_ids=x, labels=x).loss.item() * (int(length) - 1)
            count += int(length) - 1
    return total / count


@pytest.mark.parametrize("token_sums", [False, True])
def test_matches_transformers_loss(tiny_lm, blocks, token_sums):
    got = lm_eval_loss(tiny_lm, blocks, 2, "cpu", token_sums=token_sums)
    assert got == pytest.approx(transformers_loss(tiny_lm, blocks), rel=1e-5)


def test_shard_reads_every_world_size_th_block_and_pads_the_forwards(tiny_lm, blocks):
    """Without a process group the 'average over ranks' is this rank's own number: rank 1 of 2 measures blocks
    1, 3, ...; where its shard runs out it still runs a forward (all padding, no targets)."""
    three = blocks.subset([0, 1, 2])  # rank 0: blocks 0 and 2; rank 1: block 1, then a padding forward
    calls = []
    tiny_lm.register_forward_hook(lambda mod, args, kwargs, out: calls.append(1), with_kwargs=True)
    got = lm_eval_loss(tiny_lm, three, 1, "cpu", collective=True, shard=(1, 2), token_sums=True)
    assert len(calls) == 2  # as many forwards as rank 0, which has the most blocks
    assert got == pytest.approx(transformers_loss(tiny_lm, three.subset([1])), rel=1e-5)
    with pytest.raises(ValueError, match="collective"):
        lm_eval_loss(tiny_lm, blocks, 1, "cpu", shard=(0, 2))


def test_runs_in_eval_mode_and_restores_the_mode(tiny_lm, blocks):
    seen = []
    tiny_lm.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    for training in (True, False):
        tiny_lm.train(training)
        lm_eval_loss(tiny_lm, blocks, 4, "cpu")
        assert tiny_lm.training is training
    assert seen and not any(seen)
