"""How a conversation becomes the text a model reads: the tokenizer's chat template, an HH transcript, or plain text.

Canonical rows keep conversations as HH transcripts ("\\n\\nHuman: ...\\n\\nAssistant:", a system turn as the text
before the first "\\n\\nHuman:"), which every format adapter produces and the TinyHH oracle reads. A model sees
them rendered in its own format, chosen by `data.chat_template`:

- auto: as the model was trained by alignlab (recorded in its tokenizer_config.json), else the tokenizer's chat
  template when it has one, else hh;
- hh: the HH transcript as written (models without a chat format; TinyHH);
- none: plain text, no conversation markup: the user's message is the prompt (single-turn data only).

With a template, the template's end-of-turn token (ChatML's <|im_end|>, Llama 2's </s>) is the EOS: it ends every
trained answer and every sampled one. A prompt that is not an HH transcript (a TRL plain prompt) is used verbatim
in every mode. The kind is recorded on the tokenizer and saved with it, so a reward model scores text the way it
was trained and the next stage renders as the previous one did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alignlab.data.formats import ASSISTANT, HUMAN, FormatProblem, parse_hh
from alignlab.errors import ConfigError

log = logging.getLogger("alignlab.data")

CHAT_TEMPLATES = ("auto", "hh", "none")  # data.chat_template
KINDS = ("template", "hh", "none")  # what auto resolves to
_KEY = (
    "alignlab_chat_format"  # tokenizer init kwarg (tokenizer_config.json): the kind a model was trained with
)
_CACHE = "_alignlab_chat"  # per-tokenizer-object cache of the resolved ChatFormat


class ChatTemplateError(ConfigError):
    """A chat template alignlab cannot use (no end-of-turn token, not prefix-consistent)."""


@dataclass(frozen=True)
class ChatFormat:
    kind: str  # template | hh | none
    eos_id: int  # the token that ends an answer (the template's end-of-turn token in template mode)
    answer_prefix: str = ""  # template: what the template writes between its generation prompt and an answer


def prompt_turns(prompt: str) -> list[tuple[str, str]] | None:
    """The (role, content) turns of an HH prompt that ends with "\\n\\nAssistant:", or None for any other text."""
    if not prompt.endswith(ASSISTANT):
        return None
    try:
        turns = parse_hh(prompt + " x", system=True)[:-1]  # the open last turn parses as " x"
    except FormatProblem:
        return None
    return turns if turns and turns[-1][0] == "user" else None


def _messages(turns) -> list[dict[str, str]]:
    # HH puts one space after each tag; a chat template puts the content right after the role header
    return [{"role": r, "content": c[1:] if r != "system" and c.startswith(" ") else c} for r, c in turns]


def _template(tokenizer, turns, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        _messages(turns), tokenize=False, add_generation_prompt=generation_prompt
    )


def probe_template(tokenizer) -> tuple[str, str | None]:
    """(answer prefix, end-of-turn token) of a chat template, read off one rendered exchange: the text between the
    generation prompt and an answer (ChatML: none; an HH-style template: one space), and the special token written
    right after the answer (None: the template writes nothing there, the tokenizer's EOS ends answers)."""
    turns = [("user", " PING"), ("assistant", " PONG")]
    full, head = _template(tokenizer, turns, False), _template(tokenizer, turns[:1], True)
    at = full.rindex("PONG")
    if not full.startswith(head) or at < len(head):
        raise ChatTemplateError(
            f"the chat template of {tokenizer.name_or_path} does not continue its generation prompt with the "
            "answer, so alignlab cannot tell where an answer starts; set data.chat_template=hh"
        )
    after = full[at + 4 :].lstrip(" ")
    if not after.strip():
        return full[len(head) : at], None
    specials = sorted({*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}, key=len, reverse=True)
    for token in specials:
        if token and after.startswith(token):
            return full[len(head) : at], token
    raise ChatTemplateError(
        f"the chat template of {tokenizer.name_or_path} writes {after[:20]!r} after an answer, not a special "
        "end-of-turn token, so alignlab cannot tell where an answer ends; set data.chat_template=hh"
    )


def use(tokenizer, chat_template: str = "auto") -> ChatFormat:
    """Resolve data.chat_template for this tokenizer, record it on the tokenizer (saved with it), and in template
    mode make the template's end-of-turn token the tokenizer's EOS (so generation stops there)."""
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"data.chat_template={chat_template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    recorded = tokenizer.init_kwargs.get(_KEY)
    if chat_template == "auto":
        kind = recorded or ("template" if getattr(tokenizer, "chat_template", None) else "hh")
    else:
        kind = chat_template
        if kind == "template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{tokenizer.name_or_path} has no chat template")
        if recorded and recorded != kind:
            log.warning(
                "%s was trained on %s-rendered conversations; data.chat_template=%s renders them as %s",
                tokenizer.name_or_path,
                recorded,
                chat_template,
                kind,
            )
    tokenizer.init_kwargs[_KEY] = kind
    prefix = ""
    if kind == "template":
        prefix, eot = probe_template(tokenizer)
        if eot is not None and eot != tokenizer.eos_token:
            log.info("chat template: %r ends an answer, so it is the EOS (was %r)", eot, tokenizer.eos_token)
            tokenizer.eos_token = eot
    fmt = ChatFormat(kind, tokenizer.eos_token_id, prefix)
    setattr(tokenizer, _CACHE, fmt)
    return fmt


def format_of(tokenizer) -> ChatFormat:
    """The tokenizer's rendering (data.chat_template=auto unless use() chose another)."""
    fmt = getattr(tokenizer, _CACHE, None)
    return fmt if fmt is not None else use(tokenizer, "auto")


def _kind(tokenizer) -> str:
    return "hh" if tokenizer is None else format_of(tokenizer).kind  # no tokenizer: the HH transcript itself


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the model reads before its answer."""
    kind = _kind(tokenizer)
    turns = prompt_turns(prompt) if kind != "hh" else None
    if turns is None:
        return prompt
    if kind == "template":
        return _template(tokenizer, turns, True)
    if len(turns) > 2 or (len(turns) == 2 and turns[0][0] != "system"):
        raise ValueError(
            "data.chat_template=none renders single-turn prompts only (plain text has no turn markup); this "
            "prompt has earlier turns: use data.chat_template=hh or a model with a chat template"
        )
    return "\n\n".join(c.strip() for _, c in turns) + "\n\n"


def render_answer(tokenizer, prompt: str, answer: str) -> str:
    """The answer's text as it follows the rendered prompt (HH's one space after the tag is the template's header
    in template mode)."""
    kind = _kind(tokenizer)
    if kind == "hh" or prompt_turns(prompt) is None:
        return answer
    content = answer[1:] if answer.startswith(" ") else answer
    return format_of(tokenizer).answer_prefix + content if kind == "template" else content


def segments(tokenizer, prompt: str, completion: str, all_turns: bool) -> list[tuple[str, bool]]:
    """(text, trained) pieces of the rendered prompt + answer. all_turns: earlier assistant answers of the prompt
    (with their end-of-turn) train too; role headers and user turns never do."""
    text = render_prompt(tokenizer, prompt)
    answer = render_answer(tokenizer, prompt, completion)
    turns = prompt_turns(prompt) if all_turns else None
    if not turns or not any(r == "assistant" for r, _ in turns):
        return [(text, False), (answer, True)]
    kind = _kind(tokenizer)
    if kind == "none":
        raise ValueError("stage.train_on=all_assistant_turns needs turns: data.chat_template=none has none")
    pieces: list[tuple[str, bool]] = []
    at = 0
    for start, trained in _answer_spans(tokenizer, kind, text, turns):
        if text[start : start + len(trained)] != trained or start < at:
            raise ChatTemplateError(
                f"the chat template of {tokenizer.name_or_path} does not render earlier turns as a prefix of the "
                "conversation, so their answers cannot be located; use stage.train_on=last_turn"
            )
        pieces += [(text[at:start], False), (trained, True)]
        at = start + len(trained)
    pieces += [(text[at:], False), (answer, True)]
    return [(t, trained) for t, trained in pieces if t]


def _answer_spans(tokenizer, kind: str, text: str, turns) -> list[tuple[int, str]]:
    """(offset in text, trained text) of each earlier assistant answer of a rendered prompt."""
    spans = []
    if kind == "hh":
        pos = 0
        for role, content in turns:
            pos += 0 if role == "system" else len(HUMAN if role == "user" else ASSISTANT)
            if role == "assistant":
                spans.append((pos, content))
            pos += len(content)
        return spans
    for j, (role, content) in enumerate(turns):
        if role == "assistant":
            start = len(_template(tokenizer, turns[:j], True))
            trained = format_of(tokenizer).answer_prefix + _messages([(role, content)])[0]["content"]
            eos = tokenizer.eos_token
            if eos and text[start + len(trained) :].startswith(eos):
                trained += eos  # an earlier answer's end-of-turn token is learnt as well
            spans.append((start, trained))
    return spans
