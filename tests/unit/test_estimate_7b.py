"""scripts/bench/estimate_7b.py: the memory and FLOP arithmetic of the 7B PPO estimate, checked by hand."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "bench"))
import estimate_7b as est  # noqa: E402


def test_llama2_7b_parameter_count():
    # meta-llama/Llama-2-7b-hf: 6,738,415,616 parameters (untied embeddings)
    assert est.Shape().params == 6_738_415_616


def test_zero_memory_per_gpu():
    # 1B trained parameters on 8 GPUs: 16 bytes each; ZeRO-2 keeps the 2-byte weights whole, ZeRO-3 nothing
    assert est.trained_bytes(1e9, 8, 0) == 16e9
    assert est.trained_bytes(1e9, 8, 2) == pytest.approx(2e9 + 14e9 / 8)
    assert est.trained_bytes(1e9, 8, 3) == pytest.approx(2e9)
    # a frozen module outside the engines is a full copy on every rank, even under ZeRO-3
    assert est.frozen_bytes(1e9, 8, 3, in_engine=False) == 2e9
    assert est.frozen_bytes(1e9, 8, 3, in_engine=True) == pytest.approx(0.25e9)


def test_lora_reference_costs_no_memory_and_training_is_6n():
    shape = est.Shape(layers=2, hidden=8, intermediate=16, vocab=10)
    mem = est.memory(shape, gpus=1, zero=2, lora_r=2, micro=1, seq=4, rollouts_per_gpu=1)
    assert mem["reference (the actor, adapters off)"] == 0
    # KV cache: 1 rollout x 4 tokens x (K and V, 2 bytes each) x 2 layers x 8 = 256 bytes
    assert mem["rollout KV cache"] == 256
    t = est.iteration_time(shape, 1, 2, 0, 1, 2, 2, 1, peak=1.0, mfu=1.0, bandwidth=1e30, link=1.0, rel={})
    # training: 6N per token x 4 tokens x 1 epoch x (actor + critic)
    assert t["train"] == pytest.approx(6 * shape.params * 4 * 2)
    assert t["reference"] == pytest.approx(3 * 2 * shape.params * 4)
