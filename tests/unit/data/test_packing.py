import math

import torch

from alignlab.data.packing import (
    EpochOrder,
    Packed,
    lm_labels,
    micro_batch_positions,
    pack_documents,
    unigram_loss,
)
from alignlab.evaluation.tinyhh import wilson_interval
from alignlab.recipes.pretrain import lr_lambda


def test_documents_are_packed_whole_and_best_fit():
    docs = [[1] * 6, [2] * 5, [3] * 4, [4] * 3, [5] * 2]
    packed = pack_documents(docs, seq_len=8, pad_id=0)
    assert packed.tokens.shape == (3, 8) and packed.truncated == 0
    blocks = [row[:n].tolist() for row, n in zip(packed.tokens, packed.lengths, strict=True)]
    assert sorted(sorted(set(b)) for b in blocks) == [[1, 5], [2, 4], [3]]  # 6+2, 5+3, 4
    assert sorted(sum(blocks, [])) == sorted(sum(docs, []))  # every token once, none split
    assert all((row[n:] == 0).all() for row, n in zip(packed.tokens, packed.lengths, strict=True))
    assert math.isclose(packed.fill, 20 / 24)


def test_long_documents_are_truncated_and_counted():
    packed = pack_documents([[7] * 10, [8] * 3], seq_len=4, pad_id=0)
    assert packed.truncated == 1 and packed.tokens[0].tolist() == [7, 7, 7, 7]


def test_labels_mask_padding_by_position_so_eos_survives_when_pad_is_eos():
    eos = pad = 2
    packed = pack_documents([[1, 5, 6, eos], [1, 7, eos]], seq_len=8, pad_id=pad)
    labels = lm_labels(packed.tokens, packed.lengths)
    assert labels[0].tolist() == [1, 5, 6, eos, 1, 7, eos, -100]
    assert (labels[0] == eos).sum() == 2  # both document-ending EOS keep their label


def test_unigram_loss_matches_hand_computation():
    train = Packed(torch.tensor([[1, 1, 2, 0]]), torch.tensor([3]), 0)
    held = Packed(torch.tensor([[1, 2, 0, 0]]), torch.tensor([2]), 0)
    # counts (+1 smoothing) over ids 0..2: id0 1, id1 3, id2 2 -> p(2) = 2/6; the only target is id 2
    assert math.isclose(unigram_loss(train, held), -math.log(2 / 6), rel_tol=1e-9)


def test_every_world_size_reads_the_same_global_batches_across_epochs():
    order, batch, micro = EpochOrder(n_blocks=10, seed=3), 8, 2
    for step in range(4):  # 32 positions over 10 blocks: batches straddle epoch boundaries
        one = [
            i for m in range(4) for i in order(micro_batch_positions(step, m, 0, 1, micro, batch)).tolist()
        ]
        two = [
            i
            for m in range(2)
            for r in range(2)
            for i in order(micro_batch_positions(step, m, r, 2, micro, batch)).tolist()
        ]
        assert one == two
    seen = order(range(0, 10)).tolist() + order(range(10, 20)).tolist()
    assert sorted(seen[:10]) == list(range(10)) == sorted(seen[10:])  # each epoch is a permutation
    assert seen[:10] != seen[10:]  # and a new one
    assert EpochOrder(10, seed=3)(range(25)).tolist() == order(range(25)).tolist()  # recomputable anywhere


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = lr_lambda(warmup=10, total=110, min_ratio=0.1)
    assert math.isclose(f(0), 0.1) and math.isclose(f(9), 1.0)
    assert math.isclose(f(10), 1.0) and math.isclose(f(60), 0.55) and math.isclose(f(110), 0.1)
    assert math.isclose(f(500), 0.1)


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert math.isclose(low, 0.4038, abs_tol=1e-3) and math.isclose(high, 0.5962, abs_tol=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
