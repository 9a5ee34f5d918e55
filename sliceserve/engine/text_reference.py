"""The reference of engine/text_stream.py: a request's whole output decoded again at each step.

Simple and plainly right (prefix-stable for byte-level and SentencePiece tokenizers), but its
work grows with the output, so the engine runs TextStream and the tests hold it to this. Only
text that can no longer change is sent: never a trailing replacement character (a UTF-8
sequence still incomplete), never the first characters of what could become a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextStep:
    delta: str
    stopped: bool  # a stop string appeared: the output ends before it


def text_step(text: str, emitted: int, stop: list[str], final: bool) -> TextStep:
    """What to send now, given the decoded output `text` of which `emitted` chars were sent."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    if cut >= 0:
        return TextStep(text[emitted:cut] if cut > emitted else "", True)
    if final:
        return TextStep(text[emitted:], False)
    stable = text.rstrip("\ufffd")  # an incomplete character may yet complete a stop string
    safe = len(stable) - stop_prefix_at_end(stable, stop)
    return TextStep(text[emitted:safe] if safe > emitted else "", False)


def stop_prefix_at_end(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (so may grow into it)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
