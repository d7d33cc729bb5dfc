"""The one seeded held-out split (alignlab/data/splits.py) picks, for every stage, exactly the rows that stage's own
split picked before they were merged: same rows, same order, for the arguments the stages pass.

The OLD_* functions are the five splits as they were written in the stages (sft.load_demonstrations,
rm.split_held_out, rejection_sampling.split_eval, rollout.held_out_split, pretrain.run) before this module
replaced them; they are the record of the selections to keep, not a model of the new code.
"""

from __future__ import annotations

import pytest
import torch

from alignlab.data.splits import held_out_count, seeded_split
from alignlab.finetune import split_generated
from alignlab.recipes.rm import split_held_out


def _perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def OLD_sft(rows, eval_rows, seed):
    order = _perm(len(rows), seed)
    n_eval = min(eval_rows, max(1, len(rows) // 5))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def OLD_rm(rows, n, seed):
    order = _perm(len(rows), seed)
    n = min(n, max(1, len(rows) // 4))
    return [rows[i] for i in order[n:]], [rows[i] for i in order[:n]]


def OLD_rs(rows, n, seed):
    n = max(1, min(n, len(rows) // 5))
    order = _perm(len(rows), seed)
    return [rows[i] for i in order[n:]], [rows[i] for i in order[:n]]


def OLD_rollout(rows, n_eval, seed, world_size=1):
    order = _perm(len(rows), seed)
    n = min(n_eval, len(rows) // 5)
    n -= n % world_size
    return [rows[i] for i in order[n:]], [rows[i] for i in order[:n]]


def OLD_pretrain(texts, eval_fraction, seed):
    order = _perm(len(texts), seed)
    n_eval = max(1, int(len(texts) * eval_fraction))
    return [texts[i] for i in order[n_eval:]], [texts[i] for i in order[:n_eval]]


SIZES = [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 19, 20, 21, 37, 100, 257]
WANTED = [0, 1, 2, 3, 7, 50, 1000]


@pytest.mark.parametrize("n_rows", SIZES)
def test_every_stage_split_picks_the_rows_it_picked_before(n_rows):
    rows = [{"row": i} for i in range(n_rows)]
    for seed in (0, 1, 1234):
        for wanted in WANTED:
            assert seeded_split(rows, wanted, seed, max_share=5, share_floor=1) == OLD_sft(rows, wanted, seed)
            assert split_held_out(rows, wanted, seed) == OLD_rm(rows, wanted, seed)
            assert seeded_split(rows, wanted, seed, max_share=5, at_least=1) == OLD_rs(rows, wanted, seed)
            if n_rows >= 2:  # fewer generated rows is an error (nothing left to train on)
                assert split_generated(rows, wanted, seed) == OLD_rs(rows, wanted, seed)
            for ws in (1, 2, 3, 4):
                new = seeded_split(rows, wanted, seed, max_share=5, multiple_of=ws)
                assert new == OLD_rollout(rows, wanted, seed, ws)
        for fraction in (0.0, 0.01, 0.05, 0.1, 0.2, 0.5):
            new = seeded_split(rows, int(n_rows * fraction), seed, at_least=1)
            assert new == OLD_pretrain(rows, fraction, seed)


def test_held_out_counts_by_hand():
    # sft: a fifth at most, but one row of a tiny set
    assert held_out_count(100, 64, max_share=5, share_floor=1) == 20
    assert held_out_count(100, 8, max_share=5, share_floor=1) == 8
    assert held_out_count(3, 8, max_share=5, share_floor=1) == 1
    assert held_out_count(3, 0, max_share=5, share_floor=1) == 0
    # rejection sampling / context distillation: at least one even when none is asked for
    assert held_out_count(3, 0, max_share=5, at_least=1) == 1
    assert held_out_count(12, 0, max_share=5, at_least=1) == 1
    # rollouts: a fifth at most, a multiple of the world size, and none of a tiny set
    assert held_out_count(64, 16, max_share=5, multiple_of=4) == 12
    assert held_out_count(4, 16, max_share=5, multiple_of=1) == 0
    # pretrain: no cap, at least one
    assert held_out_count(10, 0, at_least=1) == 1
    assert held_out_count(10, 9) == 9


def test_the_split_is_a_partition_in_permutation_order_and_leaves_the_global_rng_alone():
    rows = list(range(10))
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    train, held_out = seeded_split(rows, 3, seed=0)
    assert torch.rand(1) == before  # its own generator: the stage's random stream is untouched
    assert len(held_out) == 3 and sorted(train + held_out) == rows
    assert held_out + train == _perm(10, 0)
    assert seeded_split(rows, 3, seed=0) == (train, held_out)
    assert seeded_split(rows, 3, seed=1) != (train, held_out)


def test_split_generated_needs_two_rows():
    with pytest.raises(ValueError, match="1 generated row"):
        split_generated([{"prompt": "p"}], 4, 0)
