"""The FastAPI application over an engine, and `serve`, which runs it under uvicorn.

Routes: GET /health (no key), GET /metrics, GET /version, GET /v1/models, GET /v1/models/{id},
POST /v1/completions, POST /v1/chat/completions, POST /tokenize, POST /detokenize.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from sliceserve import __version__
from sliceserve.engine.engine import QueueFull, RequestRejected, ShuttingDown
from sliceserve.engine.engine_process import EngineDied
from sliceserve.errors import SliceserveError
from sliceserve.server.chat import create_chat_completion
from sliceserve.server.completions import create_completion
from sliceserve.server.errors import APIError, bad_request, install_error_handlers, queue_full, shutting_down
from sliceserve.server.metrics import GPUProbe, ResponseCounter, render_metrics
from sliceserve.server.middleware import Gate
from sliceserve.server.settings import ServerSettings
from sliceserve.server.tokens import create_detokenize, create_tokenize
from sliceserve.serving_process import settle_for_serving

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def create_app(engine: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The app serving `engine` (which the caller starts and shuts down)."""
    settings = settings or ServerSettings()
    app = FastAPI(title="sliceserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings = engine, settings
    # an engine in its own process reads its GPUs there (EngineProcess.gpus)
    app.state.responses, app.state.gpus = ResponseCounter(), getattr(engine, "gpus", None) or GPUProbe()
    app.state.stopping = threading.Event()  # set when shutdown begins: every new request gets 503
    created = int(time.time())

    def model_card() -> dict:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": created,
            "owned_by": "sliceserve",
            "root": settings.model_name,
            "parent": None,
            "max_model_len": engine.max_model_len,  # the engine's: what a request may use
            "vocab_size": engine.model.spec.vocab_size,
        }

    @app.get("/health")
    async def health() -> dict:
        if not getattr(engine, "alive", True):  # an engine process that died: take this server out
            raise engine_dead("the engine process has died")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        text = render_metrics(engine.stats, app.state.responses, app.state.gpus)
        return PlainTextResponse(text, media_type=PROMETHEUS_TEXT)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != settings.model_name:
            raise APIError(
                404, f"the model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found"
            )
        return model_card()

    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    app.add_api_route("/tokenize", create_tokenize, methods=["POST"])
    app.add_api_route("/detokenize", create_detokenize, methods=["POST"])

    @app.exception_handler(QueueFull)
    async def full(request: Request, error: QueueFull) -> JSONResponse:
        return queue_full().response()

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, error: RequestRejected) -> JSONResponse:
        return bad_request(str(error) or "the engine cannot take this request").response()

    @app.exception_handler(EngineDied)
    async def dead(request: Request, error: EngineDied) -> JSONResponse:
        return engine_dead(str(error)).response()

    @app.exception_handler(ShuttingDown)  # a request that passed the Gate just before shutdown began
    async def stopping(request: Request, error: ShuttingDown) -> JSONResponse:
        return shutting_down().response()

    install_error_handlers(app)
    routes = {route.path for route in app.routes}
    app.add_middleware(
        Gate,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        routes=routes,
        responses=app.state.responses,
        stopping=app.state.stopping,
        allowed_hosts=(settings.host, *settings.allowed_hosts),
    )
    return app


def engine_dead(reason: str) -> APIError:
    return APIError(
        503, f"{reason}: the server cannot generate until it is restarted", "server_error", None, "engine_dead"
    )


def uvicorn_config(app: FastAPI, settings: ServerSettings, log_level: str = "info"):
    """uvicorn's settings for `app`: the deadlines and the connection cap that keep slow or
    stalled clients from holding the server (ServerSettings says what each one bounds)."""
    import uvicorn

    from sliceserve.server.connections import http_protocol

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        lifespan="off",
        http=http_protocol(settings.header_timeout),
        timeout_keep_alive=settings.keep_alive_timeout,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=5,  # a backstop: the drain (server/shutdown.py) has ended every response
    )


def display_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_address(host: str, port: int) -> None:
    """Fail in one line if the server could not listen on host:port (taken, or not this machine's)."""
    if not 0 <= port <= 65535:
        raise SliceserveError(f"--port must be from 0 to 65535, not {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos[:1]:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
                probe.bind(address)
    except OSError as error:
        reason = error.strerror or str(error)
        raise SliceserveError(
            f"cannot listen on {display_url(host, port)}: {reason}; pick another --port (or --host)"
        ) from None


def serve(engine: Any, settings: ServerSettings) -> None:
    """Start the engine and serve it until SIGTERM or Ctrl-C, then drain (server/shutdown.py)
    and return normally; print the URL once listening."""
    from sliceserve.server.shutdown import DrainingServer

    settle_for_serving()  # the lock handed over every 0.5 ms, the heap loaded so far frozen
    app = create_app(engine, settings)
    server = DrainingServer(uvicorn_config(app, settings), engine, app.state.stopping, settings.shutdown_grace)

    async def run() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
            print(
                f"sliceserve: serving {settings.model_name} at {display_url(settings.host, port)}/v1"
                f"{' (API key required)' if settings.api_key else ''}",
                flush=True,
            )
        await serving

    engine.start()
    try:
        asyncio.run(run())
    except SystemExit as exit:  # uvicorn could not start (it logged why): the port was taken meanwhile
        if exit.code:
            raise SliceserveError(f"could not listen on {display_url(settings.host, settings.port)}") from None
    except KeyboardInterrupt:  # signals outside serving (or not in the main thread): a normal stop too
        pass
    finally:
        engine.shutdown()
