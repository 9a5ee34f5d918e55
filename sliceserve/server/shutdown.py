"""How the server stops on SIGTERM or SIGINT (Ctrl-C): it drains, then uvicorn shuts down.

uvicorn alone, on a signal, closes its listener and waits (`timeout_graceful_shutdown`) for
the running responses, then cancels them: every stream is cut after an ordinary chunk, with no
final chunk and no ``data: [DONE]``, while the engine generates on for nobody; then it re-raises
the signal, which kills the process before the engine is shut down (and a Ctrl-C unwinds as
KeyboardInterrupt through every task). Here the first signal starts a drain instead:

  1. every new request is answered 503 (the Gate reads `stopping`), /health included, so a
     load balancer takes the server out;
  2. the engine takes nothing new and gives the requests it holds `grace` seconds to finish;
     then it ends the rest as "cancelled", which each stream reports as an error event followed
     by ``data: [DONE]`` (a whole answer as a 503);
  3. only then is uvicorn told to exit; its responses have all ended, so its own shutdown is
     quick, and the signal is not re-raised: `serve` returns and the process exits with 0.

A second signal ends the running requests at once instead of waiting out the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

log = logging.getLogger("sliceserve.server")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Any, stopping: threading.Event, grace: float):
        super().__init__(config)
        self.engine, self.stopping, self.grace = engine, stopping, grace
        self.draining: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Our handlers in place of uvicorn's while serving (which re-raises the signal after)."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        loop = asyncio.get_running_loop()
        previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)

    def on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.draining is None:
            log.info(
                "sliceserve: %s: shutting down; new requests get 503, running ones have %g s to finish",
                name,
                self.grace,
            )
            self.stopping.set()
            self.draining = asyncio.ensure_future(self.drain())
        else:
            log.info("sliceserve: %s again: ending the running requests now", name)
            self.engine.cancel_all()

    async def drain(self) -> None:
        try:
            await asyncio.to_thread(self.engine.shutdown, self.grace)
            log.info("sliceserve: engine stopped")
        finally:
            self.should_exit = True
