"""Rendering a checkpoint's chat template under a time and a size limit.

The template is Jinja that comes with the checkpoint, and it runs over the user's messages.
Transformers renders it in Jinja's sandbox, which bounds what the template may touch but not
how long it runs or how much it writes: a loop of 99999 x 99999 hangs a request for ever.
So the rendering thread is traced while the template runs (only the template's compiled code,
which Jinja compiles under the file name "<template>"): each of its lines checks a deadline, and
each piece of text it emits counts towards a size limit. Past either, the template stops with
an exception at its next line, and no thread is left running.

The messages' own text must not act as control tokens: a user message holding "<|im_start|>system"
would otherwise open a system turn. So the special tokens' texts in message fields are swapped for
markers before rendering, and put back as plain text (split_special_tokens) when the rendered
prompt is tokenized; only the template's own special tokens stay special.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

TEMPLATE_SECONDS = 2.0  # real templates render in milliseconds
TEMPLATE_MAX_CHARS = 8 << 20  # far more than any context takes; bodies are at most 1 MiB by default
COMPILED_TEMPLATE_FILE = "<template>"


class ChatTemplateError(ValueError):
    """The chat template failed on these messages, refused them, or exceeded a limit (one line)."""


class TemplateLimit(Exception):
    pass


@contextmanager
def template_limits(seconds: float, max_chars: int) -> Iterator[None]:
    """Within the block, templates rendered by this thread stop (TemplateLimit) once they have
    run `seconds` or emitted `max_chars` characters."""
    deadline = time.monotonic() + seconds
    emitted = 0

    def in_template(frame, event: str, arg: Any):
        nonlocal emitted
        if time.monotonic() > deadline:
            raise TemplateLimit(f"the chat template ran longer than {seconds:g} s")
        # The top-level render function is a generator: each of its yields is a piece of output.
        if event == "return" and isinstance(arg, str) and frame.f_code.co_name == "root":
            emitted += len(arg)
            if emitted > max_chars:
                raise TemplateLimit(f"the chat template rendered more than {max_chars} characters")
        return in_template

    def on_call(frame, event: str, arg: Any):
        return in_template(frame, event, arg) if frame.f_code.co_filename == COMPILED_TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def render_chat(
    tokenizer: Any,
    conversation: list[dict],
    *,
    tools: list[dict] | None = None,
    seconds: float = TEMPLATE_SECONDS,
    max_chars: int = TEMPLATE_MAX_CHARS,
) -> list[int]:
    """The prompt's token ids: `conversation` rendered by the tokenizer's chat template (given
    `tools`, the function definitions, where there are any), ending with the opening of the
    assistant's turn. Raises ChatTemplateError."""
    from jinja2 import TemplateError

    marker = f"\ue000{secrets.token_hex(8)}:"  # a private-use character and a nonce: no user can guess it
    (conversation, tools), escaped = escape_special_tokens(tokenizer, (conversation, tools), marker)
    extra = {} if tools is None else {"tools": tools}
    try:
        with template_limits(seconds, max_chars):
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False, **extra)
    except TemplateLimit as error:
        raise ChatTemplateError(str(error)) from None
    except TemplateError as error:  # the sandbox's refusals and the template's own raise_exception(...)
        raise ChatTemplateError(f"the chat template refused them: {error}") from None
    except Exception as error:  # the template's own failure on these messages (range too big, a bad type, ...)
        raise ChatTemplateError(f"the chat template failed: {type(error).__name__}: {error}") from None
    return tokenize_rendered(tokenizer, text, marker, escaped)


def special_token_texts(tokenizer: Any) -> list[str]:
    """The texts the tokenizer reads as special tokens, longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {*getattr(tokenizer, "all_special_tokens", []), *(t.content for t in added.values() if t.special)}
    return sorted((t for t in texts if t), key=len, reverse=True)


def escape_special_tokens(tokenizer: Any, value: Any, marker: str) -> tuple[Any, list[str]]:
    """`value` (the conversation, tools: dicts, lists and tuples of them) with every special token's
    text in its strings, keys as well, replaced by `marker` + its number + ";", and the texts so
    replaced, by number."""
    texts = special_token_texts(tokenizer)
    if not texts:
        return value, []
    pattern = re.compile("|".join(map(re.escape, texts)))
    escaped: list[str] = []

    def swap(found: re.Match) -> str:
        escaped.append(found.group())
        return f"{marker}{len(escaped) - 1};"

    def escape(value: Any) -> Any:  # bodies nest at most 32 levels (server/generation.py): recursion is safe
        if isinstance(value, str):
            return pattern.sub(swap, value)
        if isinstance(value, dict):
            return {escape(key): escape(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(escape(item) for item in value)
        return value

    return escape(value), escaped


def tokenize_rendered(tokenizer: Any, text: str, marker: str, escaped: list[str]) -> list[int]:
    """The rendered prompt's ids: the template's text as the tokenizer reads it (its special
    tokens special), each escaped text from the messages as plain text."""
    if not escaped:  # as apply_chat_template(tokenize=True) does
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids: list[int] = []
    pieces = re.split(re.escape(marker) + r"(\d+);", text)
    for i, piece in enumerate(pieces):
        if i % 2:  # a number: the escaped text
            if int(piece) >= len(escaped):
                raise ChatTemplateError("the chat template altered the messages' special-token texts")
            ids += tokenizer(escaped[int(piece)], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            if marker[1:-1] in piece.lower():  # the template cut a marker (a filter such as truncate or upper)
                raise ChatTemplateError("the chat template altered the messages' special-token texts")
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids
