"""Running an HTTP request's choices on the engine: n engine streams merged into one.

Each choice is one engine request, pumped by its own task into a shared queue. `open`
waits until every choice has either produced its first event or failed, so that a full
queue or a rejected request is answered with its own status (429, 400) before any byte of
a streaming response has been sent. `close` cancels the tasks; cancelling a task closes
its engine stream, which cancels the engine request and frees its slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from sliceserve.engine.requests import GenerationEvent, SamplingParams, TokenLogprob

T = TypeVar("T")


@dataclass
class Choice:
    """One generated alternative of a request, and what it has produced so far."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_chars: int = 0  # characters of the tokens' strings so far (logprobs' text offsets)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when its params ask for them

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, event: GenerationEvent) -> None:
        self.text_parts.append(event.text)
        self.logprobs += event.logprobs
        self.token_chars += sum(len(lp.token) for lp in event.logprobs)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.finished:
            self.finish_reason = event.finish_reason
            self.prompt_tokens = event.prompt_tokens or len(self.prompt_ids)
            self.completion_tokens = event.completion_tokens


class ChoiceStreams:
    def __init__(self, engine: Any, choices: list[Choice]):
        self.engine = engine
        self.choices = choices
        self.queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException]] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.buffered: list[tuple[int, GenerationEvent]] = []

    async def pump(self, choice: Choice) -> None:
        stream = self.engine.stream(choice.prompt_ids, choice.params)
        try:
            async for event in stream:
                self.queue.put_nowait((choice.index, event))
        except Exception as error:  # QueueFull, RequestRejected, or an engine failure
            self.queue.put_nowait((choice.index, error))
        finally:
            await stream.aclose()

    async def open(self) -> None:
        """Start every choice; raise the first failure (after cancelling the rest)."""
        self.tasks = [asyncio.create_task(self.pump(choice)) for choice in self.choices]
        started: set[int] = set()
        try:
            while len(started) < len(self.choices):
                index, item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                started.add(index)
                self.buffered.append((index, item))
        except BaseException:
            self.close()
            raise

    async def events(self) -> AsyncIterator[tuple[Choice, GenerationEvent]]:
        """Every event of every choice, in arrival order, each already added to its choice."""
        unfinished = len(self.choices)
        pending = self.buffered
        self.buffered = []
        while unfinished:
            index, item = pending.pop(0) if pending else await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            choice = self.choices[index]
            choice.add(item)
            if item.finished:
                unfinished -= 1
            yield choice, item

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()

    def usage(self) -> dict:
        """Prompt tokens counted once per prompt (as OpenAI does with n > 1), completions per choice."""
        prompts = {c.prompt_index: c.prompt_tokens for c in self.choices}
        prompt_tokens, completion_tokens = sum(prompts.values()), sum(c.completion_tokens for c in self.choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def wait_for_disconnect(request: Request) -> None:
    # Once the body has been read, the ASGI receive channel only ever reports the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientGone if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done():
        raise ClientGone()
    return task.result()
