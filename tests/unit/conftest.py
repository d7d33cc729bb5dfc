"""Unit-test fixtures: a tiny word-level tokenizer and tiny random Llama models (no data, no training)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

WORDS = "Human : Assistant hi hello how ? like this . sure no yes a b c d".split()


def word_tokenizer(pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if pad_is_eos:
        fast.pad_token = fast.eos_token
    return fast


@pytest.fixture
def tokenizer():
    return word_tokenizer()


def tiny_config(tok, **kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **kw,
    )


@pytest.fixture
def tiny_lm(tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(tokenizer)).eval()


@pytest.fixture
def tiny_rm(tokenizer):
    torch.manual_seed(0)
    return LlamaForSequenceClassification(tiny_config(tokenizer, num_labels=1)).eval()
