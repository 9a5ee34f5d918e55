"""POST /v1/completions: text in, text out; with echo, the prompt too, scored when logprobs ask.

What lm-evaluation-harness sends to score text: `{"prompt": [token ids], "max_tokens": 1,
"logprobs": 1, "echo": true}` (or `max_tokens: 0`). The answer's logprobs then start with the
prompt's tokens: null for the first, then each token's logprob given those before it, computed
in the prefill (engine/prompt_scoring.py) and batched with every other request.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from sliceserve.engine.requests import GenerationEvent
from sliceserve.engine.text_stream import TextStream
from sliceserve.server.errors import bad_request
from sliceserve.server.generation import AnswerShape, check_model, max_tokens_for, parse_body, respond
from sliceserve.server.logprobs import LogprobsWriter, joined
from sliceserve.server.protocol import CompletionRequest
from sliceserve.server.streams import Choice, ChoiceStreams
from sliceserve.server.structured_output import compile_response_format, grammar_states

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def vocabulary_size(engine) -> int:
    return engine.model.spec.vocab_size


def tokenize(tokenizer, prompts: list[str | list[int]], vocab: int, add_special_tokens: bool = True) -> list[list[int]]:
    token_lists = []
    for prompt in prompts:
        if isinstance(prompt, str):
            token_lists.append(list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]))
        else:
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"prompt: token id {bad} is outside the vocabulary (0 to {vocab - 1})", "prompt")
            token_lists.append(list(prompt))
        if not token_lists[-1]:
            raise bad_request("prompt: the prompt is empty once tokenized", "prompt")
    return token_lists


@dataclass
class Echo:
    """A prompt as an answer repeats it: its text, and each token's character offset in it."""

    text: str
    offsets: list[int]


def echo_of(tokenizer, prompt: str | list[int], ids: list[int], skip_special_tokens: bool, exact: bool) -> Echo:
    """The prompt's text as sent (or decoded, for token ids or a truncated prompt); offsets from
    decoding token by token (a token inside a character starts where the character does)."""
    stream = TextStream(tokenizer, skip_special_tokens=skip_special_tokens)
    text, offsets = "", []
    for token in ids:
        offsets.append(len(text))
        text += stream.add([token]).delta
    text += stream.finish().delta
    return Echo(prompt if exact and isinstance(prompt, str) else text, offsets)


@dataclass
class Prepared:
    prompt_ids: list[list[int]]
    echoes: list[Echo | None]
    bad_words_ids: list[list[int]]


def prepare(body: CompletionRequest, tokenizer, prompts: list[str | list[int]], vocab: int) -> Prepared:
    """Tokenizer work, off the event loop: the prompts' ids, their echoes, the bad words' ids."""
    token_lists = tokenize(tokenizer, prompts, vocab, body.add_special_tokens is not False)
    truncated = [body.truncated(ids) for ids in token_lists]
    echoes: list[Echo | None] = [None] * len(prompts)
    if body.echo:
        skip = body.skip_special_tokens is not False
        echoes = [
            echo_of(tokenizer, p, ids, skip, ids == full) for p, ids, full in zip(prompts, truncated, token_lists)
        ]
    return Prepared(truncated, echoes, body.bad_words_ids(tokenizer))


async def create_completion(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    model = check_model(request, body)
    engine, settings = request.app.state.engine, request.app.state.settings
    vocab = vocabulary_size(engine)
    body.check_vocabulary(vocab)
    prompts = body.prompts()
    if len(prompts) * body.choices > settings.max_choices:
        raise bad_request(
            f"n times the number of prompts is {len(prompts) * body.choices}; this server allows "
            f"at most {settings.max_choices}",
            "n",
        )
    prepared = await run_in_threadpool(prepare, body, engine.tokenizer, prompts, vocab)
    grammar = await run_in_threadpool(compile_response_format, body.response_format, engine)
    choices = []
    for p, ids in enumerate(prepared.prompt_ids):
        max_tokens = max_tokens_for(len(ids), body.max_tokens, DEFAULT_MAX_TOKENS, engine.max_model_len, "prompt")
        grammars = grammar_states(grammar, engine, body.choices)
        for i in range(body.choices):
            # each prompt's choice i takes seed + i, as it would alone
            params = body.sampling_params(max_tokens, i, body.logprobs, prepared.bad_words_ids, grammars[i])
            choices.append(Choice(p * body.choices + i, p, ids, params))
    writer = LogprobsWriter(engine.pieces, bool(body.return_tokens_as_token_ids))
    echoed: set[int] = set()  # choices whose prompt a stream has sent

    def echo_part(choice: Choice) -> tuple[str, dict | None]:
        """The prompt's text and (with logprobs) its part of the logprobs."""
        echo = prepared.echoes[choice.prompt_index]
        if echo is None:
            return "", None
        scored = choice.prompt_logprobs
        if body.logprobs is None or scored is None:
            return echo.text, None
        return echo.text, writer.echoed(choice.prompt_ids, scored, echo.offsets, body.logprobs)

    def prompt_logprobs(choice: Choice) -> dict:
        if body.prompt_logprobs is None or choice.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": writer.prompt_logprobs(choice.prompt_logprobs, body.prompt_logprobs)}

    def whole(streams: ChoiceStreams, response_id: str, created: int) -> dict:
        entries = []
        for c in streams.choices:
            echo_text, echo_logprobs = echo_part(c)
            logprobs = None
            if body.logprobs is not None:
                logprobs = writer.completion(c.logprobs, len(echo_text))
                logprobs = logprobs if echo_logprobs is None else joined(echo_logprobs, logprobs)
            entries.append(
                {
                    "index": c.index,
                    "text": echo_text + c.text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    **prompt_logprobs(c),
                }
            )
        return {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": entries,
            "usage": streams.usage(),
        }

    def chunk_choice(choice: Choice, event: GenerationEvent) -> dict | None:
        first = choice.index not in echoed and (body.echo or body.prompt_logprobs is not None)
        echoed.add(choice.index)
        if not (event.text or event.logprobs or event.finished or first):
            return None
        echo_text, echo_logprobs = echo_part(choice) if first else ("", None)
        logprobs = None
        if body.logprobs is not None:
            start = choice.token_chars - sum(len(lp.token) for lp in event.logprobs)  # already added
            echo = prepared.echoes[choice.prompt_index]
            logprobs = writer.completion(event.logprobs, start + (len(echo.text) if echo else 0))
            logprobs = logprobs if echo_logprobs is None else joined(echo_logprobs, logprobs)
        return {
            "index": choice.index,
            "text": echo_text + event.text,
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
            **(prompt_logprobs(choice) if first else {}),
        }

    shape = AnswerShape("cmpl", "text_completion", whole, chunk_choice, response_id=body.request_id)
    return await respond(request, body, model, choices, shape)
