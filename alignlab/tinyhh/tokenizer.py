"""TinyHH tokenizer: byte-level BPE trained on the world's text, saved as a PreTrainedTokenizerFast.

Byte-level BPE round-trips text exactly (the "\n\nHuman:" markers and the judge's "(A)" survive decoding), and
with a vocabulary of 1024 on a closed world of ~900 words most words are one or two tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from alignlab.tinyhh import world

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# HH transcript layout for chat messages, so `apply_chat_template` and the HH adapters agree.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '\n\nAssistant: ' + m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


def tokenizer_training_text(rows: dict[str, list[dict]]) -> Iterator[str]:
    """Every text the model will see, plus every world sentence (so rare sentences are tokenised like common ones)."""
    for name in ("corpus", "sft", "preferences"):
        for row in rows.get(name, []):
            yield from (v for v in row.values() if isinstance(v, str))
    for topic in (*world.BENIGN_TOPICS, *world.HARMFUL_TOPICS):
        yield " ".join(topic.steps)
    for t in world.HARMFUL_TOPICS:
        yield f"{t.refusal} {t.alternative}"


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Prepend BOS like Llama tokenizers do; EOS is appended by the recipes where a sequence really ends.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
