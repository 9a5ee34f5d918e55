"""What every request passes before a route sees it: the API key, the body size limit,
and the count of answers by route and status. Plain ASGI (not Starlette's
BaseHTTPMiddleware), so streaming responses and disconnects pass through untouched."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sliceserve.server.errors import bad_request, too_large, unauthorized
from sliceserve.server.metrics import ResponseCounter

OPEN_PATHS = {"/health"}  # answered without the API key


class Gate:
    def __init__(
        self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, routes: set[str], responses: ResponseCounter
    ):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.routes = routes
        self.responses = responses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500  # if the app fails before it answers

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
        finally:
            self.responses.count(route, status)

    def refusal(self, scope: Scope):
        """The error that answers this request before the app reads it, if any."""
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                return unauthorized()
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
