"""stage.sft packing=true is padding-free: position ids restart per example and only a varlen attention kernel
(flash attention) keeps packed examples apart. With sdpa (the CPU default) they attend to each other, so the recipe
refuses packing there instead of training on contaminated context."""

from __future__ import annotations

import pytest
import torch

from alignlab.finetune import check_packing
from tests.unit.conftest import tiny_config, word_tokenizer


def test_sdpa_lets_packed_examples_attend_to_each_other():
    from transformers import LlamaForCausalLM

    tok = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tok)).eval()
    assert model.config._attn_implementation == "sdpa"
    a, b = torch.tensor([[1, 5, 6, 7, 2]]), torch.tensor([[1, 8, 9, 2]])
    with torch.no_grad():
        separate = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], dim=1)
        packed = model(
            input_ids=torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
        ).logits
    assert torch.allclose(packed[:, :5], separate[:, :5], atol=1e-5)  # the first example sees only itself
    assert not torch.allclose(packed[:, 5:], separate[:, 5:], atol=1e-3)  # the second sees the first


def test_packing_is_refused_without_a_varlen_kernel():
    check_packing(False, "sdpa")
    check_packing(True, "flash_attention_2")
    with pytest.raises(ValueError, match="attend to each other"):
        check_packing(True, "sdpa")
