"""What a generation request asks for, and what the engine sends back while serving it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; n >= 0: the chosen token's plus the top n
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, float]]  # the top-n alternatives, most likely first


@dataclass
class GenerationEvent:
    """One step of a request's output: new text (may be empty) and, at the end, why it ended."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" when finished
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_ids = itertools.count()


@dataclass
class Request:
    """A request's state inside the engine (owned by the engine thread once submitted)."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[GenerationEvent], None]
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the KV cache
    output_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0  # characters of the decoded output already sent
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def length(self) -> int:
        """Tokens in the KV cache once the last sampled token is written."""
        return len(self.prompt_ids) + len(self.output_ids)

    def cancel(self) -> None:
        """Safe from any thread: the engine frees the slot at its next step."""
        self.cancelled = True
