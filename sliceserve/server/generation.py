"""What completions and chat completions share: parsing the body, checking the model and
the context length, and answering from the choices' streams (whole or as server-sent events)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from sliceserve.engine.requests import GenerationEvent
from sliceserve.server.errors import APIError, bad_request, internal_error, validation_message
from sliceserve.server.protocol import GenerationRequest
from sliceserve.server.streams import Choice, ChoiceStreams, ClientGone, unless_disconnected

log = logging.getLogger("sliceserve.server")
R = TypeVar("R", bound=GenerationRequest)


MAX_JSON_DEPTH = 32  # far deeper than any request's shape; validating and re-encoding recurse once a level


def reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def nested_deeper_than(data: object, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels (counted without recursion)."""
    stack = [(data, 1)] if isinstance(data, (dict, list)) else []
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def too_deep() -> APIError:
    return bad_request(f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep")


async def read_body(request: Request) -> bytes:
    """The whole body, or 408 if it does not arrive in time (a client that disconnects midway
    raises ClientDisconnect, which the Gate counts as 499)."""
    timeout = request.app.state.settings.body_timeout
    try:
        return await asyncio.wait_for(request.body(), timeout)
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {timeout:g} s",
            "invalid_request_error",
            None,
            "request_timeout",
            headers={"Connection": "close"},  # its unread rest would be taken for the next request
        ) from None


async def parse_body(request: Request, model: type[R]) -> R:
    raw = await read_body(request)
    try:
        data = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    except RecursionError:  # the parser recurses once per level: a few KB of [[[[... exhaust the stack
        raise too_deep() from None
    if nested_deeper_than(data, MAX_JSON_DEPTH):
        raise too_deep()
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:  # JSON may escape a lone UTF-16 surrogate, which no tokenizer can encode
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the request body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None
    try:
        body = model.model_validate(data)
    except ValidationError as error:
        raise bad_request(*validation_message(error.errors())) from None
    body.check()
    return body


def check_model(request: Request, body: GenerationRequest) -> str:
    served = request.app.state.settings.model_name
    if body.model is not None and body.model != served:
        raise APIError(
            404,
            f"the model '{body.model}' does not exist; this server serves '{served}'",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    return served


def max_tokens_for(
    prompt_tokens: int,
    requested: int | None,
    default: int | None,
    max_model_len: int,
    prompt_param: str,
    tokens_param: str = "max_tokens",
) -> int:
    """The tokens to generate: as asked, or the default clipped to the context left."""
    if prompt_tokens >= max_model_len:
        raise bad_request(
            f"the prompt is {prompt_tokens} tokens long; this model's context is {max_model_len} tokens",
            prompt_param,
            "context_length_exceeded",
        )
    room = max_model_len - prompt_tokens
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise bad_request(
            f"the prompt ({prompt_tokens} tokens) plus {tokens_param} ({requested}) exceed this model's "
            f"context of {max_model_len} tokens",
            tokens_param,
            "context_length_exceeded",
        )
    return requested


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def failure(event: GenerationEvent) -> APIError | None:
    """The error an event reports (engine failure, or a request cancelled by shutdown)."""
    if event.finish_reason == "error":
        return APIError(
            500, f"generation failed: {event.error or 'engine error'}", "server_error", None, "internal_error"
        )
    if event.finish_reason == "cancelled":
        return APIError(
            503, "the request was cancelled: the server is shutting down", "server_error", None, "cancelled"
        )
    return None


@dataclass
class AnswerShape:
    """How a route writes its answer: the whole object, and its chunks when streaming."""

    id_prefix: str
    chunk_object: str
    whole: Callable[[ChoiceStreams, str, int], dict]  # (streams, id, created) -> response object
    chunk_choice: Callable[[Choice, GenerationEvent], dict | None]  # a chunk's choices entry, None: nothing to send
    opening: Callable[[Choice], dict] | None = None  # a first entry per choice, before any event
    response_id: str | None = None  # the id's tail (vLLM's request_id), else a random one


async def collect(streams: ChoiceStreams) -> None:
    await streams.open()
    async for _, event in streams.events():
        error = failure(event)
        if error is not None:
            raise error


async def respond(
    request: Request, body: GenerationRequest, model: str, choices: list[Choice], shape: AnswerShape
) -> Response:
    """Run the choices and answer: one JSON object, or server-sent events when body.stream."""
    streams = ChoiceStreams(request.app.state.engine, choices)
    response_id, created = f"{shape.id_prefix}-{shape.response_id or uuid.uuid4().hex}", int(time.time())
    try:
        # Streaming too waits for every choice's first event: a full queue (429) or a rejected
        # request (400) is then answered with its status, before the first byte of a 200.
        await unless_disconnected(request, collect(streams) if not body.stream else streams.open())
    except ClientGone:
        return Response(status_code=499)  # nobody reads it: the status is for the access log
    finally:
        if not body.stream:
            streams.close()
    if not body.stream:
        return JSONResponse(shape.whole(streams, response_id, created))

    def chunk(entries: list[dict]) -> dict:
        out = {"id": response_id, "object": shape.chunk_object, "created": created, "model": model, "choices": entries}
        if body.include_usage:
            out["usage"] = None
        return out

    async def events() -> AsyncIterator[bytes]:
        # Starlette cancels this generator when the client disconnects; closing the streams
        # then cancels every engine request of this HTTP request.
        try:
            if shape.opening is not None:
                yield sse(chunk([shape.opening(choice) for choice in choices]))
            async for choice, event in streams.events():
                error = failure(event)
                if error is not None:
                    yield sse(error.body())
                    break
                entry = shape.chunk_choice(choice, event)
                if entry is not None:
                    yield sse(chunk([entry]))
            else:
                if body.include_usage:
                    yield sse({**chunk([]), "usage": streams.usage()})
        except Exception:  # the status line is sent: report in the stream, then end it
            log.exception("generation failed while streaming")
            yield sse(internal_error().body())
        finally:
            streams.close()
        yield sse("[DONE]")

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
