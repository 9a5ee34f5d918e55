"""POST /v1/chat/completions: messages through the tokenizer's chat template, then generation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from sliceserve.engine.requests import GenerationEvent, TokenLogprob
from sliceserve.server.errors import bad_request
from sliceserve.server.generation import AnswerShape, check_model, max_tokens_for, parse_body, respond
from sliceserve.server.protocol import ChatCompletionRequest, ChatMessage
from sliceserve.server.streams import Choice, ChoiceStreams


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """The prompt's token ids: the messages rendered by the tokenizer's chat template,
    ending with the opening of the assistant's turn."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "this model's tokenizer has no chat template, so it cannot take chat messages; "
            "use /v1/completions with a plain prompt",
            "messages",
            "no_chat_template",
        )
    conversation = []
    for message in messages:
        entry = {"role": message.role, "content": message.text()}
        if message.name is not None:
            entry["name"] = message.name
        conversation.append(entry)
    try:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    except TemplateError as error:  # includes the template's own raise_exception(...)
        raise bad_request(f"messages: the chat template refused them: {error}", "messages") from None
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if not ids:
        raise bad_request("messages: the chat template rendered an empty prompt", "messages")
    return list(ids)


def token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {**token_entry(lp.token, lp.logprob), "top_logprobs": [token_entry(t, v) for t, v in lp.top]}
            for lp in logprobs
        ]
    }


async def create_chat_completion(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    model = check_model(request, body)
    engine, settings = request.app.state.engine, request.app.state.settings
    if body.choices > settings.max_choices:
        raise bad_request(f"n is {body.choices}; this server allows at most {settings.max_choices}", "n")
    prompt_ids = await run_in_threadpool(chat_prompt_ids, engine.tokenizer, body.messages)
    tokens_param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = max_tokens_for(
        len(prompt_ids), body.requested_max_tokens(), None, engine.max_model_len, "messages", tokens_param
    )
    logprobs = body.logprobs_count()
    choices = [Choice(i, 0, prompt_ids, body.sampling_params(max_tokens, i, logprobs)) for i in range(body.choices)]

    def whole(streams: ChoiceStreams, response_id: str, created: int) -> dict:
        entries = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None if logprobs is None else chat_logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in streams.choices
        ]
        return {
            "id": response_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": entries,
            "usage": streams.usage(),
        }

    def opening(choice: Choice) -> dict:
        return {
            "index": choice.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def chunk_choice(choice: Choice, event: GenerationEvent) -> dict | None:
        if not (event.text or event.logprobs or event.finished):
            return None
        return {
            "index": choice.index,
            "delta": {"content": event.text} if event.text or not event.finished else {},
            "logprobs": None if logprobs is None else chat_logprobs(event.logprobs),
            "finish_reason": event.finish_reason,
        }

    shape = AnswerShape("chatcmpl", "chat.completion.chunk", whole, chunk_choice, opening)
    return await respond(request, body, model, choices, shape)
