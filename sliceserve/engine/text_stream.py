"""A request's output text, token by token, in work linear in its length.

Decoding the whole output again at each token costs O(n) per token, O(n²) per request. Here a
step decodes a short window only (the prefix_offset/read_offset technique of vLLM and TGI):

    ids:  ... | prefix_offset ........ read_offset ........ len(ids)
                 context (last step)     tokens since the window last moved

The window keeps the previous step's tokens as context, so that tokenizers whose text depends on
what comes before (SentencePiece drops the leading space of the first token) decode the new
tokens as they read in the whole text; `sent` counts the window's characters already passed on.
Text is never sent while it ends in a replacement character (an incomplete UTF-8 sequence whose
next bytes are still to come), nor while its end could be the start of a stop string. Stop strings
are looked for in the new text plus that held-back tail only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sliceserve.engine.text_reference import TextStep, stop_prefix_at_end

REPLACEMENT = "\ufffd"
# New tokens that may wait for a whole character before the window moves on anyway: more than any
# UTF-8 character needs; only a run of broken bytes gets there, and the window stays bounded.
MAX_PENDING = 8


class TextStream:
    """The text of one request's output, given token by token: `add` says what is safe to send."""

    def __init__(
        self, tokenizer: Any, stop: Sequence[str] = (), skip_special_tokens: bool = True, include_stop: bool = False
    ):
        """include_stop: the text ends after the stop string found, not before it."""
        self.tokenizer = tokenizer
        self.backend = plain_backend(tokenizer)
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop
        # Skipped tokens are left out of `ids`: a window starting at one would decode the token
        # after it as the first of the text (and lose its SentencePiece space).
        self.skipped = special_token_ids(tokenizer) if skip_special_tokens else set()
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window decoded at each step starts here
        self.read_offset = 0  # the window's tokens from here on came after it last moved
        self.sent = 0  # characters of the window's text already passed on
        self.held = ""  # passed on but not sent: it may be the start of a stop string
        self.stopped = False
        self.done = False

    def add(self, token_ids: int | Iterable[int], final: bool = False) -> TextStep:
        """The text safe to send now that `token_ids` follow; `final` flushes all that is left.

        A request that ends on eos gives `finish()` (or `final=True`) without the eos token.
        """
        if self.done:
            return TextStep("", self.stopped)
        new = ""
        for i in [token_ids] if isinstance(token_ids, int) else token_ids:
            if i not in self.skipped:
                self.ids.append(i)
                new += self.detokenize()  # token by token: each boundary is a chance to move the window
        if final:
            new += self.decode(self.ids[self.prefix_offset :])[self.sent :]
        step = self.release(new, final)
        self.stopped, self.done = step.stopped, final or step.stopped
        return step

    def finish(self) -> TextStep:
        return self.add([], final=True)

    def detokenize(self) -> str:
        """The window's new text that can no longer change, now that one more token came."""
        text = self.decode(self.ids[self.prefix_offset :])
        end = len(text.rstrip(REPLACEMENT))  # a broken character waits for its bytes
        new = text[self.sent : end]
        self.sent = max(self.sent, end)
        if end == len(text) or len(self.ids) - self.read_offset > MAX_PENDING:
            new += self.move_window(text)
        return new

    def move_window(self, text: str) -> str:
        """Start the window at the tokens since it last moved; returns what became final before it.

        Normally all of `text` was passed on. After a run of broken bytes its replacement characters
        are not: those in the new window's text stay unsent (they may yet join the next bytes).
        """
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        context = self.decode(self.ids[self.prefix_offset :])
        unsent = min(max(0, len(text) - self.sent), len(context) - len(context.rstrip(REPLACEMENT)))
        flushed = text[self.sent : len(text) - unsent]
        self.sent = len(context) - unsent
        return flushed

    def release(self, new: str, final: bool) -> TextStep:
        """Of the held tail and `new`: all before a stop string, else all that cannot begin one."""
        text = self.held + new
        found = [(i, -len(s)) for i, s in ((text.find(s), s) for s in self.stop) if i >= 0]
        if found:  # the earliest stop string (the longest of those starting there)
            cut, minus_length = min(found)
            self.held = ""
            return TextStep(text[: cut - minus_length] if self.include_stop else text[:cut], True)
        keep = 0 if final else stop_prefix_at_end(text, self.stop)
        self.held = text[len(text) - keep :]
        return TextStep(text[: len(text) - keep], False)

    def decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def plain_backend(tokenizer: Any):
    """The `tokenizers.Tokenizer` under a Transformers fast tokenizer whose `decode` adds nothing
    to the backend's (no clean-up of spaces): decoding through it directly skips the wrapper's
    argument conversions, most of the cost of a window of a few tokens. None otherwise."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode") or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return backend


def special_token_ids(tokenizer: Any) -> set[int]:
    """The ids that `decode(..., skip_special_tokens=True)` leaves out."""
    added = getattr(tokenizer, "added_tokens_decoder", None)  # transformers
    if added is None and hasattr(tokenizer, "get_added_tokens_decoder"):  # a bare tokenizers.Tokenizer
        added = tokenizer.get_added_tokens_decoder()
    found = {i for i, token in (added or {}).items() if getattr(token, "special", False)}
    return found | set(getattr(tokenizer, "all_special_ids", ()))
