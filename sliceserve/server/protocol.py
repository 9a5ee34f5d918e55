"""The request bodies of the OpenAI-compatible routes, validated with pydantic.

Types are strict (a string is not a number, a float is not an integer) so that a wrong
type is answered 400 instead of being guessed at. Unknown fields are ignored, as most
OpenAI-compatible servers do; known OpenAI fields this server cannot honour are refused
when set to anything but their neutral value.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from sliceserve.engine.requests import SamplingParams
from sliceserve.server.errors import bad_request

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
SEED_LIMIT = 2**63  # seeds (and seed + i for n choices) stay in [0, 2**63)
GREEDY_BELOW = 1e-5  # smaller temperatures are greedy: logits / 1e-300 overflow to inf (as vLLM does)

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictModel):
    include_usage: bool | None = False


class GenerationRequest(StrictModel):
    """The fields completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # extension: 0 or -1 means no cut
    n: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # extension: generate max_tokens tokens whatever comes
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise bad_request(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise bad_request("stop: stop sequences must not be empty strings", "stop")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def check(self) -> None:
        """What pydantic's types cannot say: combinations and unsupported features."""
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by this server (only 0)", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias")
        self.stop_list()

    def sampling_params(self, max_tokens: int, choice: int, logprobs: int | None) -> SamplingParams:
        """The engine's parameters for one choice; choice i of n gets seed + i."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=None if self.seed is None else (self.seed + choice) % SEED_LIMIT,
            stop=self.stop_list(),
            logprobs=logprobs,
            ignore_eos=bool(self.ignore_eos),
        )


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise bad_request("echo is not supported by this server", "echo")
        if self.best_of is not None and self.best_of != self.choices:
            raise bad_request("best_of is not supported by this server (only equal to n)", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise bad_request("prompt must not be empty", "prompt")
        return prompts


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise bad_request(
                f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}", "max_completion_tokens"
            )
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        if self.tools:
            raise bad_request("tools are not supported by this server", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("response_format: only type 'text' is supported", "response_format")

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
