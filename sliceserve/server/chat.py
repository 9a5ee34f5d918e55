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
from sliceserve.server.tool_parsing import ToolCallFormat
from sliceserve.server.tools import (
    ToolAnswers,
    ToolUse,
    check_template,
    forced_call_grammar,
    markers_are_special,
    template_message_calls,
    tool_use,
)


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage], tools: list[dict] | None = None) -> list[int]:
    """The prompt's token ids: the messages (and the tools offered) rendered by the tokenizer's chat
    template, ending with the opening of the assistant's turn (within server/chat_template.py's limits)."""
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
        if message.tool_calls:
            entry["tool_calls"] = template_message_calls(message.tool_calls)
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        conversation.append(entry)
    try:
        ids = render_chat(tokenizer, conversation, tools=tools)
    except ChatTemplateError as error:
        raise bad_request(f"messages: {error}", "messages") from None
    if not ids:
        raise bad_request("messages: the chat template rendered an empty prompt", "messages")
    return ids


def conversation_ids(
    tokenizer: Any, messages: list[ChatMessage], tools: ToolUse
) -> tuple[list[int], ToolCallFormat | None]:
    """The prompt's ids, the tools offered where they are, and the template's tool-call format
    (None when no tools are offered); a 400 where the template cannot take what the request has."""
    calls_at = [f"messages.{i}.tool_calls" for i, m in enumerate(messages) if m.tool_calls]
    call_format = check_template(tools, tokenizer, calls_at)
    offered = tools.definitions if call_format is not None else None
    return chat_prompt_ids(tokenizer, messages, offered), call_format


async def create_chat_completion(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    model = check_model(request, body)
    engine, settings = request.app.state.engine, request.app.state.settings
    if body.choices > settings.max_choices:
        raise bad_request(f"n is {body.choices}; this server allows at most {settings.max_choices}", "n")
    body.check_vocabulary(engine.model.spec.vocab_size)
    tools = tool_use(body)
    prompt_ids, call_format = await run_in_threadpool(conversation_ids, engine.tokenizer, body.messages, tools)
    prompt_ids = body.truncated(prompt_ids)
    bad_words_ids = await run_in_threadpool(body.bad_words_ids, engine.tokenizer)
    tokens_param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = max_tokens_for(
        len(prompt_ids), body.requested_max_tokens(), None, engine.max_model_len, "messages", tokens_param
    )
    logprobs = body.logprobs_count()
    if tools.forced:
        grammar = await run_in_threadpool(forced_call_grammar, tools, call_format, engine)
    else:
        grammar = await run_in_threadpool(compile_response_format, body.response_format, engine)
    grammars = grammar_states(grammar, engine, body.choices)
    if call_format is not None and body.skip_special_tokens is None:  # where the calls' tags are special tokens
        body.skip_special_tokens = not markers_are_special(engine.tokenizer, call_format)  # keep them, to parse
    choices = [
        Choice(i, 0, prompt_ids, body.sampling_params(max_tokens, i, logprobs, bad_words_ids, grammars[i]))
        for i in range(body.choices)
    ]
    answers = ToolAnswers(tools, call_format)
    writer = LogprobsWriter(engine.pieces, bool(body.return_tokens_as_token_ids))
    chat_logprobs = writer.chat

    def prompt_logprobs(streams: ChoiceStreams) -> dict:
        """vLLM's: the prompt's scores, once for the request (every choice shares the prompt)."""
        scored = streams.choices[0].prompt_logprobs
        if body.prompt_logprobs is None or scored is None:
            return {}
        return {"prompt_logprobs": writer.prompt_logprobs(scored, body.prompt_logprobs)}

    def entry(c: Choice) -> dict:
        message, finish_reason = answers.message(c.text, c.finish_reason)
        return {
            "index": c.index,
            "message": message,
            "logprobs": None if logprobs is None else chat_logprobs(c.logprobs),
            "finish_reason": finish_reason,
        }

    def whole(streams: ChoiceStreams, response_id: str, created: int) -> dict:
        entries = [entry(c) for c in streams.choices]
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
        delta, finish_reason = answers.delta(choice.index, event.text, event.finish_reason)
        if not (delta or event.logprobs or event.finished or scored):  # text held back, perhaps a call's start
            return None
        entry = {
            "index": choice.index,
            "delta": delta,
            "logprobs": None if logprobs is None else chat_logprobs(event.logprobs),
            "finish_reason": finish_reason,
        }
        if scored:  # in each choice's first chunk
            entry["prompt_logprobs"] = writer.prompt_logprobs(event.prompt_logprobs, body.prompt_logprobs)
        return entry

    shape = AnswerShape("chatcmpl", "chat.completion.chunk", whole, chunk_choice, opening, response_id=body.request_id)
    return await respond(request, body, model, choices, shape)
