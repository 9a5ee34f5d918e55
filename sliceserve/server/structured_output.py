"""response_format -> a compiled grammar (xgrammar), and one GrammarState per choice.

xgrammar's tokenizer info (every token's bytes) is built once per tokenizer and its compiler
kept with it; the compiler caches each distinct schema's grammar, so a schema sent again is not
compiled again. Compiling runs off the event loop (a large schema takes a while).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from sliceserve.engine.engine import eos_ids
from sliceserve.engine.grammar import GrammarState
from sliceserve.server.errors import bad_request
from sliceserve.server.protocol import ResponseFormat

GRAMMAR_CACHE_BYTES = 256 * 2**20  # compiled grammars kept per tokenizer


@functools.lru_cache(maxsize=4)
def grammar_compiler(tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]):
    """One compiler per (tokenizer, model vocabulary): the token table is the slow part to build."""
    import xgrammar

    return xgrammar.GrammarCompiler(
        tokenizer_info(tokenizer, vocab_size, stop_ids), max_threads=2, cache_limit_bytes=GRAMMAR_CACHE_BYTES
    )


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]):
    """xgrammar's table of every token's bytes, with the tokenizer's special tokens (other than
    the stop tokens) made empty: xgrammar never allows an empty token. Read from the vocabulary
    as text, `<|im_start|>` would otherwise be plain characters a JSON string may hold (for
    SmolLM2's tokenizer xgrammar detects no special token at all)."""
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = {i for i, token in added.items() if getattr(token, "special", False)} - set(stop_ids)
    special |= set(getattr(tokenizer, "all_special_ids", ())) - set(stop_ids)
    special = {i for i in special if 0 <= i < vocab_size}
    if not special:
        return info
    vocab = list(info.decoded_vocab)
    for i in special:
        vocab[i] = b""
    return xgrammar.TokenizerInfo(
        vocab,
        xgrammar.VocabType.RAW,  # the bytes are decoded already
        vocab_size=vocab_size,
        stop_token_ids=list(stop_ids),
        add_prefix_space=info.add_prefix_space,
    )


def compile_response_format(response_format: ResponseFormat | None, engine: Any):
    """The grammar a response_format asks for (None for text), or a 400 naming what is wrong."""
    if response_format is None or response_format.type == "text":
        return None
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        raise bad_request(
            "response_format: structured output needs xgrammar (pip install 'sliceserve[structured]')",
            "response_format",
        ) from None
    compiler = grammar_compiler(engine.tokenizer, engine.model.spec.vocab_size, stop_ids(engine))
    schema = response_format.schema()
    try:
        # no free whitespace: a weak model could otherwise pad with blanks until max_tokens
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception as error:  # xgrammar raises RuntimeError or its own errors for a schema it rejects
        raise bad_request(
            f"response_format.json_schema.schema is not a usable JSON schema: {one_line(error)}",
            "response_format",
        ) from None


def stop_ids(engine: Any) -> tuple[int, ...]:
    return tuple(sorted(eos_ids(engine.model, engine.tokenizer)))


def grammar_states(compiled, engine: Any, count: int) -> list[GrammarState | None]:
    """One state per choice: each walks the grammar with its own output."""
    if compiled is None:
        return [None] * count
    return [GrammarState(compiled, stop_ids(engine)) for _ in range(count)]


def one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__
