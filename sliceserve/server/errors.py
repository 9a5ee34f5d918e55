"""Errors in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server answers goes through `APIError`, so a client sees the same shape
for a bad parameter, a wrong key, an unknown route or a full queue. 500 is kept for real
internal failures: anything the user's input can cause is checked and answered as 4xx.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def queue_full() -> APIError:
    return APIError(
        429,
        "the server is at capacity: its request queue is full, retry later",
        "rate_limit_exceeded",
        None,
        "queue_full",
        headers={"Retry-After": "1"},
    )


def unauthorized() -> APIError:
    return APIError(
        401,
        "missing or incorrect API key: send 'Authorization: Bearer <key>'",
        "authentication_error",
        None,
        "invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"request body larger than the server's limit of {limit} bytes",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def wrong_content_type(received: str) -> APIError:
    return APIError(
        415,
        f"the body must be JSON sent with 'Content-Type: application/json', not {received or 'no Content-Type'}",
        "invalid_request_error",
        None,
        "unsupported_media_type",
    )


def host_not_allowed(host: str) -> APIError:
    return APIError(
        400,
        f"the Host header {host!r} is not a name of this server; start it with --allowed-hosts to accept it",
        "invalid_request_error",
        None,
        "host_not_allowed",
    )


def shutting_down() -> APIError:
    return APIError(
        503,
        "the server is shutting down: it takes no new requests",
        "server_error",
        None,
        "shutting_down",
        headers={"Connection": "close"},
    )


def internal_error() -> APIError:
    return APIError(500, "internal server error", "server_error", None, "internal_error")


HTTP_ERRORS = {
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
}


# Parts of a pydantic error location that name a union member's type, not a field.
TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal", "union"}


def location(loc: tuple) -> list[str]:
    return [
        str(part)
        for part in loc
        if part != "body" and not (isinstance(part, str) and (part in TYPE_TAGS or "[" in part or "-" in part))
    ]


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line for pydantic errors, and the parameter the first one is about."""
    first = errors[0]
    param = ".".join(location(first.get("loc", ()))) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
    if first.get("type") == "extra_forbidden":  # the schemas are an allow-list: nothing is silently ignored
        return f"{param}: unknown field; this server does not support it", param
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        type_, code = HTTP_ERRORS.get(error.status_code, ("invalid_request_error", None))
        message = f"{request.method} {request.url.path}: {error.detail}"
        return APIError(error.status_code, message, type_, None, code, headers=error.headers).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return bad_request(*validation_message(list(error.errors()))).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises the error after this answer, so the server logs its traceback.
        return internal_error().response()
