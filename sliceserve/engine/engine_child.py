"""The engine's own process: it loads the engine, runs its loop, and talks to the server over a pipe.

`EngineProcess` (engine/engine_process.py) starts `run_engine_child` with the `spawn` method, so
CUDA is initialised here only. The messages are listed in that module's docstring. Events leave
in one message per engine step: `PipeLoop` stands in for the asyncio loop `Engine.submit` takes.

The server decides when the engine stops: SIGINT (Ctrl-C reaches the terminal's whole process
group) and SIGTERM (a supervisor may signal every process of the service) are ignored here, and the
server sends `shutdown` once it has begun its drain. Once the server's end of the pipe closes (it
exited, or was killed), this process shuts its engine down and exits.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import signal
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from sliceserve.engine.engine import Engine, QueueFull, RequestRejected
from sliceserve.engine.event_wire import packed
from sliceserve.engine.requests import GenerationEvent
from sliceserve.engine.stats import EngineStats
from sliceserve.errors import SliceserveError
from sliceserve.model.spec import DecoderSpec
from sliceserve.serving_process import settle_for_serving

log = logging.getLogger("sliceserve")


@dataclass
class EngineFacts:
    """What the server needs to know of the loaded engine (the `ready` message)."""

    spec: DecoderSpec
    max_model_len: int
    pid: int


class Sender:
    """Sends on the pipe from any thread (the engine's, this process's main one, the stopper)."""

    def __init__(self, connection: Connection):
        self.connection, self.lock = connection, threading.Lock()

    def __call__(self, message: tuple) -> None:
        with self.lock:
            self.connection.send(message)


class PipeLoop:
    """What `Engine.submit(..., loop=PipeLoop)` gets in place of an asyncio loop.

    Protocol: the engine hands a loop all of a step's events for it in ONE call,
    `call_soon_threadsafe(deliver, events)`, from its own thread. Here that call runs `deliver` at
    once; `deliver` calls each request's `on_event`, which is `collector(request_id)`: it notes
    (request_id, event). The step's events then leave as one ("events", [(request_id, event), ...])
    message, each event packed (engine/event_wire.py). A pipe that is gone raises RuntimeError, as
    a closed asyncio loop does: the engine then cancels those requests.
    """

    def __init__(self, send: Sender):
        self.send = send
        self.lock = threading.Lock()
        self.batch: list[tuple[int, GenerationEvent]] = []
        self.finished: deque[int] = deque()  # ids whose last event left; the main thread forgets them

    def collector(self, request_id: int) -> Callable[[GenerationEvent], None]:
        return lambda event: self.batch.append((request_id, event))

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        with self.lock:
            self.batch = []
            callback(*args)
            batch, self.batch = self.batch, []
        self.finished.extend(request_id for request_id, event in batch if event.finished)
        try:
            self.send(("events", [(request_id, packed(event)) for request_id, event in batch]))
        except OSError as error:
            raise RuntimeError(f"the server's end of the pipe is gone: {error}") from None


def stats_snapshot(stats: EngineStats) -> dict:
    """The stats' fields, copied under their lock (a lock does not travel down a pipe)."""
    with stats.lock:
        return {f.name: copy.deepcopy(getattr(stats, f.name)) for f in dataclasses.fields(stats) if f.name != "lock"}


def failure_message(error: BaseException) -> tuple:
    """The `failed` message for a load that raised: the server raises the same kind of error."""
    if isinstance(error, SliceserveError):
        return ("failed", "SliceserveError", str(error))
    if isinstance(error, MemoryError):  # the CLI reports an out-of-memory in one line, as in one process
        return ("failed", "MemoryError", str(error))
    if isinstance(error, RuntimeError) and "out of memory" in str(error):
        return ("failed", "RuntimeError", str(error))
    log.error("the engine process failed while loading", exc_info=error)  # a bug: its traceback, from here
    return ("failed", "SliceserveError", f"the engine process failed while loading: {type(error).__name__}: {error}")


class EngineSession:
    """The engine and the requests the server has open in it, by the server's request ids."""

    def __init__(self, engine: Engine, send: Sender, extra_metrics: Callable[[], list[str]] | None):
        self.engine, self.send, self.extra_metrics = engine, send, extra_metrics
        self.loop = PipeLoop(send)
        self.requests: dict[int, Any] = {}
        self.stopper: threading.Thread | None = None

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            _, request_id, prompt_ids, params = message
            try:
                on_event = self.loop.collector(request_id)
                self.requests[request_id] = self.engine.submit(prompt_ids, params, on_event, loop=self.loop)
            except (RequestRejected, QueueFull) as error:  # ShuttingDown is a RequestRejected
                self.send(("rejected", request_id, type(error).__name__, str(error)))
            except Exception as error:  # not the client's fault: the server answers 500
                log.exception("submitting request %d failed", request_id)
                self.send(("rejected", request_id, "RuntimeError", f"internal error: {error}"))
        elif kind == "cancel":
            request = self.requests.pop(message[1], None)
            if request is not None:
                self.engine.cancel(request)
        elif kind == "cancel_all":
            self.engine.cancel_all()
        elif kind == "stats":
            lines = self.extra_metrics() if self.extra_metrics is not None else []
            self.send(("stats", message[1], stats_snapshot(self.engine.stats), lines))
        elif kind == "shutdown" and self.stopper is None:
            # in a thread of its own: cancellations (a second Ctrl-C) keep arriving while it drains
            self.stopper = threading.Thread(target=self.stop, args=(message[1],), name="sliceserve-engine-stop")
            self.stopper.start()
        while self.loop.finished:
            self.requests.pop(self.loop.finished.popleft(), None)

    def stop(self, drain: float) -> None:
        self.engine.shutdown(drain)
        self.send(("stopped",))

    @property
    def stopped(self) -> bool:
        return self.stopper is not None and not self.stopper.is_alive()


def serve_pipe(session: EngineSession, connection: Connection) -> None:
    """Handle the server's messages until the engine has stopped, or the server is gone."""
    while not session.stopped:
        try:
            if not connection.poll(0.1):  # a timeout, to notice the end of a drain
                continue
            message = connection.recv()
        except (EOFError, OSError):  # the server exited or was killed: nobody to serve
            break
        session.handle(message)
    if session.stopper is not None:
        session.stopper.join()
    else:
        session.engine.shutdown()


def run_engine_child(
    connection: Connection,
    load: Callable[[], Engine],
    log_level: int,
    extra_metrics: Callable[[], list[str]] | None = None,
) -> None:
    """The child's entry point: `load()` the engine (a picklable callable, such as a partial of
    `load_engine`), say `ready` (or `failed`, with the error), then serve the pipe."""
    import os

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(message)s")  # the loading log, on the inherited stderr
    send = Sender(connection)
    try:
        engine = load()
    except BaseException as error:  # noqa: BLE001 - every failure reaches the server as a message
        send(failure_message(error))
        return
    # This process's main thread takes the server's messages while the engine thread launches
    # kernels: each submit of a burst would otherwise wait up to 5 ms for the interpreter lock.
    settle_for_serving()
    engine.start()
    send(("ready", EngineFacts(engine.model.spec, engine.max_model_len, os.getpid())))
    serve_pipe(EngineSession(engine, send, extra_metrics), connection)
