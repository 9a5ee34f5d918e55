"""What every request passes before a route sees it: the shutdown (503 once it began), the
API key (or, without one, the Host and Content-Type checks that keep web pages out: see
ServerSettings.allowed_hosts), the body size limit, and the count of answers by route and status. Plain ASGI (not
Starlette's BaseHTTPMiddleware), so streaming responses and disconnects pass through untouched."""

from __future__ import annotations

import ipaddress
import secrets
import threading

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sliceserve.server.errors import (
    bad_request,
    host_not_allowed,
    shutting_down,
    too_large,
    unauthorized,
    wrong_content_type,
)
from sliceserve.server.metrics import ResponseCounter

OPEN_PATHS = {"/health"}  # answered without the API key
LOCAL_NAMES = ("localhost",)


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port: 'a.b:80' -> 'a.b', '[::1]:80' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_ip_address(name: str) -> bool:
    # A page cannot rebind an address: its origin would be the address itself.
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


class Gate:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        routes: set[str],
        responses: ResponseCounter,
        stopping: threading.Event | None = None,
        allowed_hosts: tuple[str, ...] = (),
    ):
        self.app = app
        self.stopping = stopping  # set once the server shuts down
        self.api_key = api_key
        # Host names accepted without an API key besides IP addresses; None: any.
        self.allowed_hosts = (
            None if "*" in allowed_hosts else {*LOCAL_NAMES, *(host_name(h) for h in allowed_hosts if h.strip())}
        )
        self.max_body_bytes = max_body_bytes
        self.routes = routes
        self.responses = responses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = None  # until the app answers

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, counted_send)
                return
            await self.app(scope, self.limited(receive), counted_send)
        except ClientDisconnect:
            # The client closed the connection (or broke its framing) while its body was read:
            # there is nobody to answer, and it is no server error (nginx's 499).
            status = status or 499
        finally:
            self.responses.count(route, 500 if status is None else status)  # None: the app failed

    def refusal(self, scope: Scope):
        """The error that answers this request before the app reads it, if any."""
        if self.stopping is not None and self.stopping.is_set():
            return shutting_down()
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                return unauthorized()
        if self.api_key is None:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host_name(host)
            if host and self.allowed_hosts is not None and name not in self.allowed_hosts and not is_ip_address(name):
                return host_not_allowed(host)
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if scope["method"] == "POST" and not is_json(content_type):
                return wrong_content_type(content_type)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return bad_request("the Content-Length header is not a number")
            if declared > self.max_body_bytes:
                return too_large(self.max_body_bytes)
        return None

    def limited(self, receive: Receive) -> Receive:
        """`receive` that fails with 413 once the body read exceeds the limit (chunked
        bodies, or a Content-Length that understates)."""
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise too_large(self.max_body_bytes)
            return message

        return receive_within_limit
