"""The engine in a process of its own, and `EngineProcess`, its client in the server's process.

In one process the engine's loop and the HTTP server's event loop share one interpreter lock: at
many concurrent streams the Python of a step (kernel launches) waits on the event loop's (SSE
chunks), and steps take up to twice as long. Here the engine runs in a child process
(engine/engine_child.py, started with `spawn`: CUDA is initialised there only) and this process
keeps the tokenizer and the HTTP work. `EngineProcess` offers what the server and the commands use
of `Engine`: stream, generate, start, shutdown, cancel_all, tokenizer, pieces, max_model_len,
model.spec, model.close, stats.

Messages over one `multiprocessing` Pipe, as tuples:

  to the child    ("submit", id, prompt_ids, params)   ("cancel", id)   ("cancel_all",)
                  ("stats", serial)                     ("shutdown", drain_seconds)
  to the server   ("ready", EngineFacts) or ("failed", kind, message), once, after loading
                  ("events", [(id, event), ...]): every event of one engine step, packed
                      (engine/event_wire.py: a plain tuple unless it has logprobs or an error)
                  ("rejected", id, kind, message): submit raised RequestRejected, ShuttingDown,
                      QueueFull (the same message the in-process engine gives) or another error
                  ("stats", serial, fields of EngineStats, extra /metrics lines)
                  ("stopped",): the engine has shut down; the child then exits

One reader thread here receives them and hands each message's events to each asyncio loop in one
`call_soon_threadsafe`. If the child dies (a crash, the OOM killer, SIGKILL), every open request
ends with an error event and new ones raise `EngineDied` (a ShuttingDown: the server answers 503).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sliceserve.engine.engine import Engine, QueueFull, RequestRejected, ShuttingDown
from sliceserve.engine.engine_child import EngineFacts, run_engine_child
from sliceserve.engine.event_wire import unpacked
from sliceserve.engine.requests import GenerationEvent, SamplingParams
from sliceserve.engine.stats import EngineStats
from sliceserve.engine.token_pieces import TokenPieces
from sliceserve.errors import SliceserveError
from sliceserve.model.spec import DecoderSpec

log = logging.getLogger("sliceserve")

STATS_TIMEOUT = 1.0  # seconds /metrics waits for the child's counters before showing the last ones
STOP_TIMEOUT = 15.0  # seconds past the drain the child gets to stop before it is killed
HELD_GAUGES = ("running", "waiting", "kv_slots_used", "kv_blocks_used")  # EngineStats' gauges of work held
REJECTIONS = {"RequestRejected": RequestRejected, "ShuttingDown": ShuttingDown, "QueueFull": QueueFull}


class EngineDied(ShuttingDown):
    """The engine's process has ended: no request can run any more."""


@dataclass
class RemoteModel:
    """The model as the server sees it: its description. The child holds the weights and frees
    them when it exits, so `close` has nothing to do."""

    spec: DecoderSpec

    def close(self) -> None:
        pass


@dataclass
class Listener:
    """Where one request's events go: `put` inside `loop` (an asyncio consumer), or directly
    from the reader thread when `loop` is None (a synchronous one)."""

    put: Callable[[GenerationEvent | BaseException], None]
    loop: asyncio.AbstractEventLoop | None = None


class RelayedMetrics:
    """The /metrics lines the child read with its last stats reply (its GPUs'), rendered as
    they came (`out` is the server's Exposition)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def render(self, out: Any) -> None:
        out.lines.extend(self.lines)


class EngineProcess:
    def __init__(
        self,
        load: Callable[[], Engine],
        load_tokenizer: Callable[[], Any],
        extra_metrics: Callable[[], list[str]] | None = None,
    ):
        """Start the child, which runs `load()` (picklable: a partial of `load_engine`, say), and
        return once the engine is loaded and its loop runs. A failure to load raises here as it
        would in this process (SliceserveError with the same message, or the out-of-memory
        RuntimeError). `extra_metrics`, called in the child, adds lines to each stats reply."""
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(
            target=run_engine_child,
            args=(child_end, load, logging.getLogger().getEffectiveLevel(), extra_metrics),
            name="sliceserve-engine",
        )
        with sigint_ignored():
            self.process.start()
        child_end.close()  # else the pipe would not end when the child dies
        try:
            self.tokenizer = tokenizer_or_error(load_tokenizer)  # while the child loads
            facts = self.wait_until_loaded()
            if isinstance(self.tokenizer, SliceserveError):
                raise self.tokenizer
        except BaseException:
            self.kill()
            raise
        self.pieces = TokenPieces(self.tokenizer)
        self.model = RemoteModel(facts.spec)
        self.max_model_len, self.pid = facts.max_model_len, facts.pid
        self.gpus = RelayedMetrics()
        self.lock = threading.Lock()  # listeners, died, closed; never held while sending (the reader needs it)
        self.send_lock = threading.Lock()
        self.listeners: dict[int, Listener] = {}
        self.ids = itertools.count()
        self.died: str | None = None  # why, once the child has died
        self.closed = False  # shut down: nothing more is sent
        self.stopped = threading.Event()  # the child said it stopped
        self.shutdown_lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.stats_serial = itertools.count()
        self.stats_replies: queue.Queue[tuple | None] = queue.Queue()  # None: the child has gone
        self.last_stats = EngineStats()
        self.reader = threading.Thread(target=self.read, name="sliceserve-engine-reader", daemon=True)
        self.reader.start()
        atexit.register(self.shutdown)  # else multiprocessing's own exit handler would wait on the child forever
        log.info("sliceserve: the engine runs in its own process (pid %d)", self.pid)

    # ---- starting ---------------------------------------------------------------------

    def wait_until_loaded(self) -> EngineFacts:
        while not self.connection.poll(0.2):
            if not self.process.is_alive():
                break
        try:
            message = self.connection.recv()
        except (EOFError, OSError):  # died without a word: killed, or out of memory
            self.process.join(timeout=5)
            raise SliceserveError(
                f"the engine process exited while loading ({exit_description(self.process.exitcode)})"
            ) from None
        if message[0] == "ready":
            return message[1]
        _, kind, text = message
        raise {"SliceserveError": SliceserveError, "MemoryError": MemoryError}.get(kind, RuntimeError)(text)

    def start(self) -> None:
        """Nothing to do: the child starts its loop once loaded (kept for `Engine`'s callers)."""

    # ---- requests ---------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, listener: Listener) -> int:
        with self.lock:
            if self.died is not None:
                raise EngineDied(self.died)
            if self.closed:
                raise ShuttingDown("the engine is shutting down")
            request_id = next(self.ids)
            self.listeners[request_id] = listener
        if not self.send(("submit", request_id, list(prompt_ids), params)):
            with self.lock:
                self.listeners.pop(request_id, None)
            raise EngineDied(self.died or "the engine process has stopped")
        return request_id

    def cancel(self, request_id: int) -> None:
        with self.lock:
            known = self.listeners.pop(request_id, None) is not None
        if known:
            self.send(("cancel", request_id))

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationEvent]:
        """Events of one request; closing this generator cancels the request and frees its slot.
        Raises what the engine's submit raised (RequestRejected, QueueFull, ShuttingDown) first."""
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        request_id = self.submit(prompt_ids, params, Listener(events.put_nowait, asyncio.get_running_loop()))
        finished = False
        try:
            while not finished:
                event = await events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                finished = event.finished
                yield event
        finally:
            if not finished:
                self.cancel(request_id)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationEvent]:
        """Synchronous version of `stream`."""
        events: queue.Queue[GenerationEvent | BaseException] = queue.Queue()
        request_id = self.submit(prompt_ids, params, Listener(events.put))
        finished = False
        try:
            while not finished:
                event = events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                finished = event.finished
                yield event
        finally:
            if not finished:
                self.cancel(request_id)

    def cancel_each(self, request_ids: set[int]) -> None:
        for request_id in request_ids:
            self.cancel(request_id)

    def cancel_all(self) -> None:
        """Cancel every request running or waiting in the child."""
        self.send(("cancel_all",))

    # ---- the pipe ---------------------------------------------------------------------

    def send(self, message: tuple) -> bool:
        """Whether the message went (not once the child is gone)."""
        try:
            with self.send_lock:
                self.connection.send(message)
            return True
        except (OSError, ValueError):  # the child is gone, or the pipe closed
            return False

    def read(self) -> None:
        """The reader thread: every message of the child, until its end of the pipe closes."""
        while True:
            try:
                message = self.connection.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                self.dispatch([(request_id, unpacked(item)) for request_id, item in message[1]])
            elif kind == "rejected":
                _, request_id, rejection, text = message
                self.dispatch([(request_id, REJECTIONS.get(rejection, RuntimeError)(text))])
            elif kind == "stats":
                self.stats_replies.put(message[1:])
            elif kind == "stopped":
                self.stopped.set()
        self.ended()

    def dispatch(self, items: list[tuple[int, GenerationEvent | BaseException]]) -> None:
        """Hand each item to its request's listener: one call into each asyncio loop."""
        to_loops: dict[asyncio.AbstractEventLoop, list] = {}
        direct = []
        with self.lock:
            for request_id, item in items:
                last = not isinstance(item, GenerationEvent) or item.finished
                listener = self.listeners.pop(request_id, None) if last else self.listeners.get(request_id)
                if listener is None:  # cancelled meanwhile: nobody waits for it
                    continue
                if listener.loop is None:
                    direct.append((listener.put, item))
                else:
                    to_loops.setdefault(listener.loop, []).append((request_id, listener.put, item))
        deliver(direct)
        for loop, batch in to_loops.items():
            try:
                loop.call_soon_threadsafe(deliver, [(put, item) for _, put, item in batch])
            except RuntimeError:  # that event loop has closed: its consumers are gone
                gone = {request_id for request_id, _, _ in batch}
                # not from this thread: a send may wait on the child, which may wait on this reader
                threading.Thread(target=self.cancel_each, args=(gone,), daemon=True).start()

    def ended(self) -> None:
        """The child's end of the pipe closed: after `stopped`, as asked; else the child died."""
        self.process.join(timeout=5)
        if self.stopped.is_set():
            reason, finish = "the engine has stopped", "cancelled"
        else:
            reason = f"the engine process died ({exit_description(self.process.exitcode)})"
            finish = "error"
            log.error("sliceserve: %s; requests get 503 until the server is restarted", reason)
        with self.lock:
            self.died = self.died or (reason if finish == "error" else None)
            open_ids = list(self.listeners)
        self.dispatch([(i, GenerationEvent("", [], [], finish_reason=finish, error=reason)) for i in open_ids])
        self.stats_replies.put(None)  # a /metrics waiting for a reply stops waiting

    @property
    def alive(self) -> bool:
        """False once the child has died (not when it was shut down)."""
        return self.died is None

    # ---- statistics -------------------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        """The child's counters now (a round trip of a few milliseconds); the last ones seen, with
        nothing running, once the child has gone; the last ones if it does not answer in time."""
        with self.stats_lock:
            serial = next(self.stats_serial)
            if self.reader.is_alive() and self.send(("stats", serial)):
                deadline = time.monotonic() + STATS_TIMEOUT
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        reply = self.stats_replies.get(timeout=left)
                    except queue.Empty:
                        break
                    if reply is None:
                        break
                    if reply[0] == serial:  # not a late reply to a call that gave up
                        self.last_stats, self.gpus.lines = EngineStats(**reply[1]), reply[2]
                        return self.last_stats
            if not self.reader.is_alive():  # a dead child holds no request and no cache
                for gauge in HELD_GAUGES:
                    if hasattr(self.last_stats, gauge):
                        setattr(self.last_stats, gauge, 0)
                self.gpus.lines = []
            return self.last_stats

    # ---- stopping ---------------------------------------------------------------------

    def shutdown(self, drain: float = 0.0) -> None:
        """As `Engine.shutdown`: take no new request, give those held up to `drain` seconds,
        end the rest as "cancelled"; then the child exits (it is killed if it does not)."""
        with self.shutdown_lock:
            if self.closed:
                return
            if self.send(("shutdown", drain)):
                self.reader.join(timeout=drain + STOP_TIMEOUT)
            with self.lock:
                self.closed = True
            self.process.join(timeout=5)
            if self.process.is_alive():
                log.error("sliceserve: the engine process did not stop; killing it")
                self.kill()
            self.reader.join(timeout=5)
            self.connection.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ctrl-C reaches the child too, and it must ignore it from its first instruction (its
    imports take seconds; the server decides when the engine stops). A signal ignored when a
    process starts stays ignored across exec; a Ctrl-C in these milliseconds is lost."""
    if threading.current_thread() is not threading.main_thread():  # only there can handlers change
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def deliver(batch: list[tuple[Callable[[Any], None], Any]]) -> None:
    for put, item in batch:
        put(item)


def tokenizer_or_error(load_tokenizer: Callable[[], Any]) -> Any:
    """The tokenizer, or its SliceserveError: raised only after the child's own load error,
    which names the problem as the in-process path does (it loads the model first)."""
    try:
        return load_tokenizer()
    except SliceserveError as error:
        return error


def exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
