"""POST /v1/completions: text in, text out."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from sliceserve.engine.requests import GenerationEvent, TokenLogprob
from sliceserve.server.errors import bad_request
from sliceserve.server.generation import AnswerShape, check_model, max_tokens_for, parse_body, respond
from sliceserve.server.protocol import CompletionRequest
from sliceserve.server.streams import Choice, ChoiceStreams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def vocabulary_size(engine) -> int:
    return engine.model.spec.vocab_size


def tokenize(tokenizer, prompts: list[str | list[int]], vocab: int) -> list[list[int]]:
    token_lists = []
    for prompt in prompts:
        if isinstance(prompt, str):
            token_lists.append(list(tokenizer(prompt)["input_ids"]))
        else:
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"prompt: token id {bad} is outside the vocabulary (0 to {vocab - 1})", "prompt")
            token_lists.append(list(prompt))
        if not token_lists[-1]:
            raise bad_request("prompt: the prompt is empty once tokenized", "prompt")
    return token_lists


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's legacy shape; text_offset counts characters from the start of the completion."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [dict(lp.top) for lp in logprobs],
        "text_offset": offsets,
    }


async def create_completion(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    model = check_model(request, body)
    engine, settings = request.app.state.engine, request.app.state.settings
    prompts = body.prompts()
    if len(prompts) * body.choices > settings.max_choices:
        raise bad_request(
            f"n times the number of prompts is {len(prompts) * body.choices}; this server allows "
            f"at most {settings.max_choices}",
            "n",
        )
    token_lists = await run_in_threadpool(tokenize, engine.tokenizer, prompts, vocabulary_size(engine))
    choices = []
    for p, ids in enumerate(token_lists):
        max_tokens = max_tokens_for(len(ids), body.max_tokens, DEFAULT_MAX_TOKENS, engine.max_model_len, "prompt")
        for i in range(body.choices):
            # each prompt's choice i takes seed + i, as it would alone
            choices.append(Choice(p * body.choices + i, p, ids, body.sampling_params(max_tokens, i, body.logprobs)))

    def whole(streams: ChoiceStreams, response_id: str, created: int) -> dict:
        entries = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": None if body.logprobs is None else completion_logprobs(c.logprobs, 0),
                "finish_reason": c.finish_reason,
            }
            for c in streams.choices
        ]
        return {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": entries,
            "usage": streams.usage(),
        }

    def chunk_choice(choice: Choice, event: GenerationEvent) -> dict | None:
        if not (event.text or event.logprobs or event.finished):
            return None
        logprobs = None
        if body.logprobs is not None:
            start = choice.token_chars - sum(len(lp.token) for lp in event.logprobs)  # already added
            logprobs = completion_logprobs(event.logprobs, start)
        return {"index": choice.index, "text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}

    shape = AnswerShape("cmpl", "text_completion", whole, chunk_choice)
    return await respond(request, body, model, choices, shape)
