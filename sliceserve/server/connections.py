"""What a connection may hold: uvicorn's HTTP/1.1 protocol, with a deadline for a request's headers.

uvicorn closes a connection that idles after an answer (``timeout_keep_alive``) but waits
forever for the headers of a request that has begun, or for the first byte of a new
connection: a client that opens connections and never finishes its headers (slowloris) keeps
them all. Here each connection has `header_timeout` seconds to deliver a request's headers,
counted from its opening, or from the first byte of a request after an answer; then it is
closed. The body's deadline is the app's (server/generation.py `read_body`: 408).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_header_timer()
        super().connection_lost(exc)

    def watch_headers(self) -> None:
        """Arm the deadline while a request's headers are awaited (h11's IDLE: before the first
        request, and once the next one has begun), drop it once they are in."""
        awaiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not awaiting:
            self.stop_header_timer()
        elif self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout, self.headers_too_slow)

    def stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_too_slow(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # as uvicorn's keep-alive timeout does: no answer, the connection ends


def http_protocol(header_timeout: float) -> functools.partial:
    """The protocol factory for uvicorn.Config(http=...)."""
    return functools.partial(HeaderDeadlineProtocol, header_timeout=header_timeout)
