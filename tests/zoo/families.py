"""Tiny random-initialised stand-ins of the model families researchers bring, built in a second on 2 cores.

Each family copies what breaks code written for one tokenizer only:
- gpt_neox (Pythia): byte-level BPE, "<|endoftext|>" is bos = eos = unk, no pad token;
- llama (Llama 2): SentencePiece-style (normaliser prepends "▁" and turns spaces into "▁", byte fallback,
  decoder strips the leading space), BOS "<s>" added to every text, EOS "</s>", no pad token;
- qwen2 (Qwen2 chat): byte-level BPE, ChatML chat template with a default system turn, eos "<|im_end|>",
  pad "<|endoftext|>", no BOS;
- gpt2: byte-level BPE, "<|endoftext|>" is bos = eos = unk = pad.

Tokenizers are trained here with `tokenizers` and saved with save_pretrained next to the model: nothing is
downloaded and no binary is committed.
"""

from __future__ import annotations

import random
from pathlib import Path

FAMILIES = ("gpt_neox", "llama", "qwen2", "gpt2")

# ChatML as Qwen2.5 ships it (simplified: no tools): a default system turn when the conversation has none.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the a an I you we it is are was be to of and in that have for not on with as do at this but by from "
    "they say help her she or will my one all would there their what so up out if about who get which go me "
    "when make can like time no just him know take people into year your good some could them see other than "
    "then now look only come its over think also back after use two how our work first well way even new want "
    "because any these give day most us safe harm sorry cannot please sure here answer question recipe bread "
    "weather tomorrow poem story code python list sort explain why water plant garden cat dog music song"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Dialogue-shaped training text for the tokenizers: HH tags, punctuation, digits, newlines, CRLF."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        a = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 16)))
        out.append(f"\n\nHuman: {q.capitalize()}?\n\nAssistant: {a.capitalize()}. {rng.randint(0, 999)}!")
    out.append("Système: café, naïve — 東京 😀 \t tabs\r\n")  # non-ASCII for byte fallback
    return out


def _byte_bpe(special: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def _sentencepiece_bpe(vocab_size: int):
    """Llama 2's fast tokenizer layout: Prepend("▁") + Replace(" ", "▁"), byte fallback, BOS by post-processor."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False
    )
    # SentencePiece never merges across a word boundary: learn merges on "▁word" pieces, then tokenize the
    # normalised text whole, as Llama 2's fast tokenizer does (it has no pre-tokenizer)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    tok.train_from_iterator(corpus(), trainer)
    tok.pre_tokenizer = None
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def build_tokenizer(family: str):
    """A PreTrainedTokenizerFast with the family's special-token layout."""
    from transformers import PreTrainedTokenizerFast

    if family == "llama":
        return PreTrainedTokenizerFast(
            tokenizer_object=_sentencepiece_bpe(600),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            add_bos_token=True,
        )
    if family == "qwen2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = PreTrainedTokenizerFast(
            tokenizer_object=_byte_bpe(specials, 500),
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>"],
        )
        tok.chat_template = CHATML_TEMPLATE
        return tok
    if family in ("gpt_neox", "gpt2"):
        eot = "<|endoftext|>"
        tok = PreTrainedTokenizerFast(
            tokenizer_object=_byte_bpe([eot], 500), bos_token=eot, eos_token=eot, unk_token=eot
        )
        if family == "gpt2":
            tok.pad_token = eot  # pad == eos, as GPT-2 recipes set it
        return tok
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def build_model(family: str, tokenizer, *, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0):
    """A random-initialised causal LM of the family sized for the tokenizer."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=512,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            **ids,
        )
        return GPTNeoXForCausalLM(config)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=2 * hidden,
            max_position_embeddings=512,
            **ids,
        )
        return LlamaForCausalLM(config)
    if family == "qwen2":
        config = Qwen2Config(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            intermediate_size=2 * hidden,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **ids,
        )
        return Qwen2ForCausalLM(config)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **ids
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def build(family: str, out_dir: str | Path) -> Path:
    """Tokenizer + random-init model saved with save_pretrained into out_dir/<family> (reused when present)."""
    path = Path(out_dir) / family
    if (path / "config.json").exists():
        return path
    tok = build_tokenizer(family)
    model = build_model(family, tok)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(path)
    return path
