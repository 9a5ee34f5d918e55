"""The request bodies of the OpenAI-compatible routes, validated with pydantic.

Types are strict (a string is not a number, a float is not an integer) so that a wrong
type is answered 400 instead of being guessed at. The schemas are an allow-list: a field
is either honoured or refused with a 400 that names it, never silently ignored.
  - Declared fields are honoured (OpenAI's and vLLM's sampling fields, echo, prompt logprobs).
  - Some are honoured only at a value that asks for nothing (`NEUTRAL`): `use_beam_search`
    false, `priority` 0; any other value is refused. Fields whose every value changes nothing
    here (`INERT`: `user`, `metadata`, `cache_salt`) are declared and accepted.
  - Fields OpenAI or vLLM define that this server does not implement (`UNSUPPORTED`) are
    refused unless null; any other field is refused as unknown.
docs/api_parity.md is the resulting table, written by tests/test_api_parity.py.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sliceserve.engine.requests import SamplingParams
from sliceserve.server.errors import bad_request

if TYPE_CHECKING:
    from sliceserve.engine.grammar import GrammarState

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
MAX_BAD_WORDS = 64
SEED_LIMIT = 2**63  # seeds (and seed + i for n choices) stay in [0, 2**63)
GREEDY_BELOW = 1e-5  # smaller temperatures are greedy: logits / 1e-300 overflow to inf (as vLLM does)

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]  # OpenAI's range for frequency and presence penalties
Bias = Annotated[float, Field(ge=-100, le=100)]  # OpenAI's range for logit_bias values
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]

# Fields of OpenAI's or vLLM's schemas this server does not implement: refused unless null.
UNSUPPORTED_SAMPLING = {
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "structured_outputs",
    "structural_tag",
    "logits_processors",
    "kv_transfer_params",
    "vllm_xargs",
    "return_token_ids",
}


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    UNSUPPORTED: ClassVar[frozenset[str]] = frozenset()
    NEUTRAL: ClassVar[dict[str, tuple]] = {}  # field -> the values it is honoured at (None always is)
    INERT: ClassVar[frozenset[str]] = frozenset()  # accepted at any value: nothing here depends on them
    WHERE: ClassVar[str] = ""  # where a nested object sits in the body, for error messages

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data: Any) -> Any:
        """Refuse a known but unimplemented field by name; a null one is as if absent."""
        if not isinstance(data, dict):
            return data
        for name in sorted(cls.UNSUPPORTED & data.keys()):
            if data[name] is not None:
                raise bad_request(f"{cls.WHERE}{name} is not supported by this server", cls.WHERE + name)
        return {k: v for k, v in data.items() if k not in cls.UNSUPPORTED}

    def check_neutral(self) -> None:
        for name, honoured in self.NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and not any(type(value) is type(h) and value == h for h in honoured):
                shown = " or ".join(repr(h).replace("'", '"') for h in honoured)
                raise bad_request(
                    f"{self.WHERE}{name} is not supported by this server (only {shown})", self.WHERE + name
                )


class StreamOptions(StrictModel):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # OpenAI pads events against length side channels; we never do

    NEUTRAL: ClassVar[dict[str, tuple]] = {"include_obfuscation": (False,)}
    UNSUPPORTED: ClassVar[frozenset[str]] = frozenset({"continuous_usage_stats"})
    WHERE: ClassVar[str] = "stream_options."


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict | None = None
    model_config = ConfigDict(strict=True, extra="allow")  # the structured-output kinds carry more

    def check(self) -> None:
        """The shape OpenAI documents: json_schema carries {"name", "schema", "strict"}; text and
        json_object carry nothing (their grammar is compiled later, with the tokenizer)."""
        if self.type == "structural_tag":
            raise bad_request(
                "response_format: type 'structural_tag' is not supported by this server", "response_format"
            )
        if self.type != "json_schema":
            return
        spec = self.json_schema
        if spec is None:
            raise bad_request("response_format: type 'json_schema' needs a json_schema object", "response_format")
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise bad_request("response_format.json_schema.name must be a non-empty string", "response_format")
        if not isinstance(spec.get("schema", {}), dict):
            raise bad_request("response_format.json_schema.schema must be a JSON object", "response_format")
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise bad_request("response_format.json_schema.strict must be a boolean", "response_format")

    def schema(self) -> dict:
        """The JSON schema the output must follow: json_object is any object (OpenAI's meaning)."""
        if self.type == "json_object":
            return {"type": "object"}
        return (self.json_schema or {}).get("schema") or {}


class GenerationRequest(StrictModel):
    """The fields completions and chat completions share."""

    # OpenAI
    model: str | None = None
    max_tokens: int | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None  # token id (a string of digits) -> added to its logit
    user: str | None = None  # neutral: nothing here depends on who asks
    # vLLM's sampling extras
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1 means no cut
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = False  # generate max_tokens tokens whatever comes
    skip_special_tokens: bool | None = None
    bad_words: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_BAD_WORDS)] | None = None
    allowed_token_ids: Annotated[list[int], Field(min_length=1)] | None = None
    prompt_logprobs: TopLogprobs | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=1)] | None = None  # keep the prompt's last N tokens
    return_tokens_as_token_ids: bool | None = None  # logprobs name tokens "token_id:N"
    request_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None  # the response id's tail
    best_of: int | None = None  # only equal to n
    response_format: ResponseFormat | None = None
    # honoured by being neutral: they change nothing here
    cache_salt: str | None = None  # salts vLLM's prefix cache; this server has no cache to share
    use_beam_search: bool | None = None
    length_penalty: float | None = None  # beam search only
    spaces_between_special_tokens: bool | None = None  # fast tokenizers always decode so
    priority: int | None = None

    UNSUPPORTED: ClassVar[frozenset[str]] = frozenset(UNSUPPORTED_SAMPLING)
    INERT: ClassVar[frozenset[str]] = frozenset({"user", "cache_salt"})
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        "use_beam_search": (False,),
        "length_penalty": (1.0,),
        "spaces_between_special_tokens": (True,),
        "priority": (0,),
    }

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

    def allows_zero_tokens(self) -> bool:
        """Whether max_tokens may be 0 (the prompt scored, nothing generated)."""
        return self.prompt_logprobs is not None

    def check(self) -> None:
        """What pydantic's types cannot say: combinations and unsupported features."""
        self.check_neutral()
        if self.stream_options is not None:
            self.stream_options.check_neutral()
        max_tokens = self.requested_max_tokens()
        least = 0 if self.allows_zero_tokens() else 1
        if max_tokens is not None and max_tokens < least:
            raise bad_request(f"max_tokens must be at least {least}, got {max_tokens}", "max_tokens")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if self.min_tokens and max_tokens is not None and self.min_tokens > max_tokens:
            raise bad_request(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens")
        if self.best_of is not None and self.best_of != self.choices:
            raise bad_request("best_of is not supported by this server (only equal to n)", "best_of")
        if self.response_format is not None:
            self.response_format.check()
            if self.response_format.type != "text":
                self.check_grammar_can_end(f"response_format {self.response_format.type}")
        self.logit_bias_ids()
        self.stop_list()

    def check_grammar_can_end(self, grammar: str) -> None:
        """A grammar's answer ends with eos once the grammar is complete (engine/grammar.py): refuse
        the fields that would hold eos back, leaving nothing the grammar allows."""
        if self.ignore_eos:
            raise bad_request(
                f"ignore_eos cannot be combined with {grammar}: the structured answer ends with eos "
                "where its grammar ends",
                "ignore_eos",
            )
        if self.min_tokens:
            raise bad_request(
                f"min_tokens cannot be combined with {grammar}: the grammar may end before "
                f"{self.min_tokens} tokens, and then only eos is left to sample",
                "min_tokens",
            )

    def logit_bias_ids(self) -> dict[int, float]:
        biases = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise bad_request(f"logit_bias: keys must be token ids (strings of digits), got {key!r}", "logit_bias")
            biases[int(key)] = float(value)
        return biases

    def check_vocabulary(self, vocab_size: int) -> None:
        """Token ids the request names must be in the vocabulary."""
        named = {
            "logit_bias": list(self.logit_bias_ids()),
            "stop_token_ids": self.stop_token_ids or [],
            "allowed_token_ids": self.allowed_token_ids or [],
        }
        for name, ids in named.items():
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise bad_request(f"{name}: token id {bad} is outside the vocabulary (0 to {vocab_size - 1})", name)

    def bad_words_ids(self, tokenizer: Any) -> list[list[int]]:
        """vLLM's rule: each word as tokenized alone and after a space, both never completed."""
        found: list[list[int]] = []
        for word in self.bad_words or []:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                if ids and ids not in found:
                    found.append(ids)
        return found

    def prompt_logprobs_count(self) -> int | None:
        return self.prompt_logprobs

    def sampling_params(
        self,
        max_tokens: int,
        choice: int,
        logprobs: int | None,
        bad_words_ids: list[list[int]] | None = None,
        grammar: GrammarState | None = None,
    ) -> SamplingParams:
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
            min_p=self.min_p or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.logit_bias_ids(),
            min_tokens=self.min_tokens or 0,
            stop_token_ids=list(self.stop_token_ids or []),
            allowed_token_ids=None if self.allowed_token_ids is None else list(self.allowed_token_ids),
            bad_words_ids=bad_words_ids or [],
            prompt_logprobs=self.prompt_logprobs_count(),
            skip_special_tokens=self.skip_special_tokens is not False,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            grammar=grammar,
        )

    def truncated(self, prompt_ids: list[int]) -> list[int]:
        keep = self.truncate_prompt_tokens
        return prompt_ids[-keep:] if keep is not None else prompt_ids


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    logprobs: TopLogprobs | None = None
    echo: bool | None = False  # the prompt comes back before the completion (with logprobs: scored)
    suffix: str | None = None
    add_special_tokens: bool | None = None  # the tokenizer's own (BOS, say) around a text prompt; default true

    UNSUPPORTED: ClassVar[frozenset[str]] = frozenset(UNSUPPORTED_SAMPLING | {"prompt_embeds"})
    NEUTRAL: ClassVar[dict[str, tuple]] = {**GenerationRequest.NEUTRAL, "suffix": ("",)}

    def allows_zero_tokens(self) -> bool:
        return bool(self.echo) or self.prompt_logprobs is not None

    def prompt_logprobs_count(self) -> int | None:
        """Top alternatives per prompt token to compute: vLLM's prompt_logprobs, or logprobs with echo."""
        counts = [c for c in (self.prompt_logprobs, self.logprobs if self.echo else None) if c is not None]
        return max(counts) if counts else None

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


class FunctionCall(StrictModel):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)

    WHERE: ClassVar[str] = "messages.*.tool_calls.*.function."


class MessageToolCall(StrictModel):
    """A call an earlier assistant turn made (multi-turn tool use)."""

    id: str
    type: Literal["function"]
    function: FunctionCall

    WHERE: ClassVar[str] = "messages.*.tool_calls.*."


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # the assistant's
    tool_call_id: str | None = None  # a tool's result answers this call

    UNSUPPORTED: ClassVar[frozenset[str]] = frozenset(
        {"function_call", "refusal", "audio", "annotations", "reasoning_content"}
    )
    WHERE: ClassVar[str] = "messages.*."

    def check(self, where: str) -> None:
        if self.tool_calls is not None and self.role != "assistant":
            raise bad_request(f"{where}.tool_calls: only assistant messages carry tool calls", f"{where}.tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise bad_request(f"{where}.tool_call_id: only tool messages answer a call", f"{where}.tool_call_id")
        for j, call in enumerate(self.tool_calls or []):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                field = f"{where}.tool_calls.{j}.function.arguments"
                raise bad_request(f"{field} must be a JSON object, as text", field)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    tools: list[dict] | None = None  # checked by server/tools.py, which names the field at fault
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call per answer
    # honoured by being neutral: without storage, they change nothing here
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict | None = None
    safety_identifier: str | None = None
    include_reasoning: bool | None = None  # the model has no reasoning to include or leave out
    echo: bool | None = None  # vLLM's: prepend the last message when it is the assistant's
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    add_special_tokens: bool | None = None

    UNSUPPORTED: ClassVar[frozenset[str]] = frozenset(
        UNSUPPORTED_SAMPLING
        | {
            "audio",
            "prediction",
            "web_search_options",
            "reasoning_effort",
            "verbosity",
            "moderation",
            "documents",
            "chat_template",
            "chat_template_kwargs",
            "mm_processor_kwargs",
        }
    )
    INERT: ClassVar[frozenset[str]] = GenerationRequest.INERT | {
        "metadata",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "safety_identifier",
        "include_reasoning",
    }
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **GenerationRequest.NEUTRAL,
        "functions": ([],),
        "function_call": ("none", "auto"),
        "store": (False,),
        "service_tier": ("auto", "default"),
        "modalities": (["text"],),
        "echo": (False,),
        "add_generation_prompt": (True,),
        "continue_final_message": (False,),
        "add_special_tokens": (False,),
    }

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
        for i, message in enumerate(self.messages):
            message.check(f"messages.{i}")

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
