"""POST /v1/chat/completions: messages through the tokenizer's chat template, then generation."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from sliceserve.engine.requests import GenerationEvent
from sliceserve.server.chat_template import ChatTemplateError, render_chat
from sliceserve.server.errors import bad_request
from sliceserve.server.generation import AnswerShape, check_model, max_tokens_for, parse_body, respond
from sliceserve.server.logprobs import LogprobsWriter
from sliceserve.server.protocol import ChatCompletionRequest, ChatMessage
from sliceserve.server.streams import Choice, ChoiceStreams
from sliceserve.server.structured_output import compile_response_format, grammar_states


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """The prompt's token ids: the messages rendered by the tokenizer's chat template,
    ending with the opening of the assistant's turn (within server/chat_template.py's limits)."""
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
        ids = render_chat(tokenizer, conversation)
    except ChatTemplateError as error:
        raise bad_request(f"messages: {error}", "messages") from None
    if not ids:
        raise bad_request("messages: the chat template rendered an empty prompt", "messages")
    return ids


async def create_chat_completion(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    model = check_model(request, body)
    engine, settings = request.app.state.engine, request.app.state.settings
    if body.choices > settings.max_choices:
        raise bad_request(f"n is {body.choices}; this server allows at most {settings.max_choices}", "n")
    body.check_vocabulary(engine.model.spec.vocab_size)
    prompt_ids = body.truncated(await run_in_threadpool(chat_prompt_ids, engine.tokenizer, body.messages))
    bad_words_ids = await run_in_threadpool(body.bad_words_ids, engine.tokenizer)
    tokens_param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = max_tokens_for(
        len(prompt_ids), body.requested_max_tokens(), None, engine.max_model_len, "messages", tokens_param
    )
    logprobs = body.logprobs_count()
    grammar = await run_in_threadpool(compile_response_format, body.response_format, engine)
    grammars = grammar_states(grammar, engine, body.choices)
    choices = [
        Choice(i, 0, prompt_ids, body.sampling_params(max_tokens, i, logprobs, bad_words_ids, grammars[i]))
        for i in range(body.choices)
    ]
    writer = LogprobsWriter(engine.pieces, bool(body.return_tokens_as_token_ids))
    chat_logprobs = writer.chat

    def prompt_logprobs(streams: ChoiceStreams) -> dict:
        """vLLM's: the prompt's scores, once for the request (every choice shares the prompt)."""
        scored = streams.choices[0].prompt_logprobs
        if body.prompt_logprobs is None or scored is None:
            return {}
        return {"prompt_logprobs": writer.prompt_logprobs(scored, body.prompt_logprobs)}

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
            **prompt_logprobs(streams),
        }

    def opening(choice: Choice) -> dict:
        return {
            "index": choice.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def chunk_choice(choice: Choice, event: GenerationEvent) -> dict | None:
        scored = body.prompt_logprobs is not None and event.prompt_logprobs is not None
        if not (event.text or event.logprobs or event.finished or scored):
            return None
        entry = {
            "index": choice.index,
            "delta": {"content": event.text} if event.text or not event.finished else {},
            "logprobs": None if logprobs is None else chat_logprobs(event.logprobs),
            "finish_reason": event.finish_reason,
        }
        if scored:  # in each choice's first chunk
            entry["prompt_logprobs"] = writer.prompt_logprobs(event.prompt_logprobs, body.prompt_logprobs)
        return entry

    shape = AnswerShape("chatcmpl", "chat.completion.chunk", whole, chunk_choice, opening, response_id=body.request_id)
    return await respond(request, body, model, choices, shape)
