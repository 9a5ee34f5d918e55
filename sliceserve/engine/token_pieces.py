"""How one token reads on its own: its text, its raw bytes, and the name logprobs give it.

A byte-level BPE token (GPT-2, Llama 3, SmolLM2) or a SentencePiece byte-fallback token
(`<0xE4>`) may hold part of a UTF-8 character; decoded alone it reads "\\ufffd". Its raw bytes
come from its vocabulary entry instead: each character of a byte-level piece stands for one
byte (GPT-2's byte-to-unicode table), a byte-fallback piece names its byte. Such a token is
named "bytes:\\xe4\\xb8" in logprobs, as OpenAI's API names them, so that different partial
tokens never share a name.
"""

from __future__ import annotations

import re
from typing import Any

REPLACEMENT = "\ufffd"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_table() -> dict[str, int]:
    """GPT-2's printable character -> byte map, which byte-level vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


BYTE_OF_CHAR = byte_level_table()


class TokenPieces:
    """Memoised per-token text, bytes and names for one tokenizer (safe to share between threads:
    every entry is computed the same way by whoever computes it first)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.texts: dict[int, str] = {}
        self.raw: dict[int, bytes] = {}

    def text(self, token_id: int) -> str:
        """The token decoded alone, special tokens included."""
        text = self.texts.get(token_id)
        if text is None:
            text = self.texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def bytes(self, token_id: int) -> bytes:
        """The token's raw bytes (a partial UTF-8 character as its bytes, not as "\\ufffd")."""
        raw = self.raw.get(token_id)
        if raw is None:
            raw = self.raw[token_id] = self.vocabulary_bytes(token_id)
        return raw

    def vocabulary_bytes(self, token_id: int) -> bytes:
        text = self.text(token_id)
        if REPLACEMENT not in text:
            return text.encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            byte = BYTE_PIECE.fullmatch(piece)
            if byte:
                return bytes([int(byte.group(1), 16)])
            if piece and all(c in BYTE_OF_CHAR for c in piece):
                return bytes(BYTE_OF_CHAR[c] for c in piece)
        return text.encode("utf-8")  # no better knowledge: the replacement character it decodes to

    def name(self, token_id: int, as_id: bool = False) -> str:
        """What logprobs call the token: its text, "bytes:\\x.." for part of a character, or
        "token_id:N" when asked (vLLM's return_tokens_as_token_ids)."""
        if as_id:
            return f"token_id:{token_id}"
        text = self.text(token_id)
        if REPLACEMENT in text:
            raw = self.bytes(token_id)
            try:
                return raw.decode("utf-8")  # a real U+FFFD
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text
