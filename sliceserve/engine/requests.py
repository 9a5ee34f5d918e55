"""What a generation request asks for, and what the engine sends back while serving it."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sliceserve.engine.grammar import GrammarState


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
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    frequency_penalty: float = 0.0  # OpenAI: logit -= this * the token's count in the output so far
    presence_penalty: float = 0.0  # OpenAI: logit -= this once the token is in the output
    repetition_penalty: float = 1.0  # vLLM/HF: tokens of prompt or output: logit / this if > 0, else * this
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # until this many are generated, eos and stop_token_ids cannot be sampled
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end the request, like eos
    allowed_token_ids: list[int] | None = None  # None: any token; else only these can be sampled
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences never completed
    prompt_logprobs: int | None = None  # None: none; n >= 0: each prompt token's logprob (after the first), top n
    skip_special_tokens: bool = True  # special tokens leave no text
    include_stop_str_in_output: bool = False  # the stop string (or stop token's text) ends the text
    grammar: GrammarState | None = None  # structured output: only tokens the grammar allows, then eos


@dataclass
class TokenLogprob:
    token: str  # the token's text decoded alone
    token_id: int
    logprob: float
    top: list[tuple[str, float]]  # the top-n alternatives, most likely first
    top_ids: list[int] = field(default_factory=list)  # their token ids
    rank: int | None = None  # 1 for the most likely token; given for prompt tokens


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
    # on a request's first event when it asked for them: None for the first prompt token, then one each
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_ids = itertools.count()


@dataclass(eq=False)  # compared (list membership, removal) by identity: field by field cost O(fields) each
class Request:
    """A request's state inside the engine (owned by the engine thread once submitted).

    `on_event` is called from the engine thread, or, when `loop` is given, inside that asyncio
    loop: the engine hands each loop one batch of events per step rather than one call a token.
    """

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[GenerationEvent], None]
    loop: asyncio.AbstractEventLoop | None = None
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    slot: int | None = None
    seed: int = 0  # the draw's key: params.seed, or a random one
    prefilled: int = 0  # tokens of prefill_ids already in the KV cache
    recomputed: int = 0  # output tokens prefilled again after a preemption
    output_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # scored so far, when params ask
    prompt_logprobs_sent: bool = False
    text: object = None  # its TextStream, once admitted
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def length(self) -> int:
        """Tokens in the KV cache once the last sampled token is written."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_ids(self) -> list[int]:
        """The tokens a prefill writes: the prompt, and after a preemption the output so far."""
        return self.prompt_ids + self.output_ids[: self.recomputed] if self.recomputed else self.prompt_ids

    @property
    def decoding(self) -> bool:
        """Its prefill is in the cache and a sampled token waits to be fed."""
        return self.prefilled == len(self.prompt_ids) + self.recomputed and bool(self.output_ids)

    def cancel(self) -> None:
        """Safe from any thread: the engine frees the slot at its next step."""
        self.cancelled = True
