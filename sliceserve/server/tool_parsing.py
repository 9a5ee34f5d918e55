"""Tool calls in a model's output: its text read into OpenAI's `tool_calls`, whole or as it streams.

Two output formats, the ones most chat templates with tools are written for (server/tools.py
picks one from the template):
  - `hermes` (Hermes 2 Pro, Qwen2.5 and the templates written after them): each call is
    `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; text around the calls is the
    message's content.
  - `llama3_json` (Llama 3.1 and 3.2 with custom tools): the whole answer is the call,
    `{"name": ..., "parameters": {...}}`, several joined by ";", perhaps after `<|python_tag|>`.

One parser serves a whole answer and a stream: it is fed the text as it comes and hands back only
what is settled, content that can no longer turn out to be part of a call and calls once whole, so
a stream assembles to exactly the whole answer's message. A call that does not parse, or names a
function that was not offered, stays in the content as the text it was.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCallFormat:
    """How a format writes one call: `call_begin` NAME `arguments_key` ARGUMENTS `call_end`
    (the text a forced call's grammar produces, server/tools.py)."""

    name: str
    call_begin: str
    arguments_key: str
    call_end: str


HERMES = ToolCallFormat("hermes", '<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>")
LLAMA3_JSON = ToolCallFormat("llama3_json", '{"name": "', '", "parameters": ', "}")
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON)}

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)

    def as_message(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def as_delta(self, index: int) -> dict:
        """The whole call in one streamed delta (the openai client accumulates by index)."""
        return {"index": index, **self.as_message()}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def read_call(value: object, names: frozenset[str]) -> ToolCall | None:
    """{"name", "arguments" (or "parameters")} naming an offered function, else None."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters"))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_call(text: str, names: frozenset[str]) -> ToolCall | None:
    try:
        return read_call(json.loads(text), names)
    except ValueError:
        return None


Piece = str | ToolCall  # settled content, or a whole call


class HermesParser:
    """`<tool_call>` blocks among text. Whitespace directly before a call and directly after one
    is dropped (the newlines a model writes between calls are not content)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.pending = ""  # text not yet settled
        self.in_call = False
        self.after_call = False

    def feed(self, text: str) -> list[Piece]:
        self.pending += text
        pieces: list[Piece] = []
        while True:
            if self.in_call:
                end = self.pending.find(HERMES_CLOSE)
                if end < 0:
                    return [p for p in pieces if p != ""]
                body, self.pending = self.pending[:end], self.pending[end + len(HERMES_CLOSE) :]
                self.in_call = False
                call = parse_call(body, self.names)
                self.after_call = call is not None
                pieces.append(call if call is not None else HERMES_OPEN + body + HERMES_CLOSE)
                continue
            if self.after_call:
                self.pending = self.pending.lstrip()
                if not self.pending:
                    return [p for p in pieces if p != ""]
                self.after_call = False
            start = self.pending.find(HERMES_OPEN)
            if start >= 0:
                pieces.append(self.pending[:start].rstrip())
                self.pending = self.pending[start + len(HERMES_OPEN) :]
                self.in_call = True
                continue
            # hold back what may still become a call's opening, and the whitespace before it
            held = partial_suffix(self.pending, HERMES_OPEN)
            settled = self.pending[: len(self.pending) - held].rstrip()
            pieces.append(settled)
            self.pending = self.pending[len(settled) :]
            return [p for p in pieces if p != ""]

    def finish(self) -> list[Piece]:
        rest, self.pending = self.pending, ""
        if self.in_call:  # ended inside a call (eos before </tool_call>): a call if its JSON is whole
            call = parse_call(rest, self.names)
            return [call if call is not None else HERMES_OPEN + rest]
        if self.after_call and rest.isspace():
            return []
        return [rest] if rest else []


class LlamaJsonParser:
    """An answer that starts with "{" (after an optional <|python_tag|>) is read as calls when it
    is whole; any other answer is content from its first character."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.pending = ""
        self.mode: str | None = None  # None (undecided), "content" or "calls"

    def feed(self, text: str) -> list[Piece]:
        if self.mode == "content":
            return [text] if text else []
        self.pending += text
        if self.mode == "calls":
            return []
        head = self.pending.lstrip()
        if head.startswith(PYTHON_TAG):
            head = head[len(PYTHON_TAG) :].lstrip()
        elif PYTHON_TAG.startswith(head):  # nothing yet, or a prefix of the tag
            return []
        if not head:
            return []
        self.mode = "calls" if head.startswith("{") else "content"
        if self.mode == "calls":
            return []
        text, self.pending = self.pending, ""
        return [text]

    def finish(self) -> list[Piece]:
        text, self.pending = self.pending, ""
        if self.mode == "calls":
            calls = self.parse_calls(text)
            if calls:
                return list(calls)
        return [text] if text else []

    def parse_calls(self, text: str) -> list[ToolCall] | None:
        body = text.strip()
        body = body[len(PYTHON_TAG) :] if body.startswith(PYTHON_TAG) else body
        decoder, calls, at = json.JSONDecoder(), [], 0
        while True:
            at = skip_space(body, at)
            try:
                value, at = decoder.raw_decode(body, at)
            except ValueError:
                return None
            call = read_call(value, self.names)
            if call is None:
                return None
            calls.append(call)
            at = skip_space(body, at)
            if at == len(body):
                return calls
            if body[at] != ";":
                return None
            at += 1


def skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class ToolCallStream:
    """One choice's output read for calls: feed it each text delta, `finish` at the end.
    At most `max_calls` calls are kept (parallel_tool_calls false: one); later ones are dropped."""

    def __init__(self, format_name: str, names: frozenset[str], max_calls: int | None = None) -> None:
        self.parser = HermesParser(names) if format_name == HERMES.name else LlamaJsonParser(names)
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content and the calls settled by this delta."""
        return self.split(self.parser.feed(text))

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self.split(self.parser.finish())

    def split(self, pieces: list[Piece]) -> tuple[str, list[ToolCall]]:
        content, calls = "", []
        for piece in pieces:
            if isinstance(piece, str):
                content += piece
            elif self.max_calls is None or len(self.calls) < self.max_calls:
                self.calls.append(piece)
                calls.append(piece)
        return content, calls


def parse_tool_calls(
    text: str, format_name: str, names: frozenset[str], max_calls: int | None = None
) -> tuple[str | None, list[ToolCall]]:
    """A whole answer's content (None when nothing is left beside the calls) and its calls."""
    stream = ToolCallStream(format_name, names, max_calls)
    content, calls = stream.feed(text)
    more_content, more_calls = stream.finish()
    content += more_content
    return (content or None) if calls or more_calls else content, calls + more_calls
