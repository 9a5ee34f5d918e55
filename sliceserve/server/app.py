"""The FastAPI application over an engine, and `serve`, which runs it under uvicorn.

Routes: GET /health (no key), GET /metrics, GET /v1/models, GET /v1/models/{id},
POST /v1/completions, POST /v1/chat/completions.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from sliceserve.engine.engine import QueueFull, RequestRejected
from sliceserve.server.chat import create_chat_completion
from sliceserve.server.completions import create_completion
from sliceserve.server.errors import APIError, bad_request, install_error_handlers, queue_full
from sliceserve.server.metrics import GPUProbe, ResponseCounter, render_metrics
from sliceserve.server.middleware import Gate
from sliceserve.server.settings import ServerSettings

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def create_app(engine: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The app serving `engine` (which the caller starts and shuts down)."""
    settings = settings or ServerSettings()
    app = FastAPI(title="sliceserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings = engine, settings
    app.state.responses, app.state.gpus = ResponseCounter(), GPUProbe()
    created = int(time.time())

    def model_card() -> dict:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": created,
            "owned_by": "sliceserve",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        text = render_metrics(engine.stats, app.state.responses, app.state.gpus)
        return PlainTextResponse(text, media_type=PROMETHEUS_TEXT)

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

    @app.exception_handler(QueueFull)
    async def full(request: Request, error: QueueFull) -> JSONResponse:
        return queue_full().response()

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, error: RequestRejected) -> JSONResponse:
        return bad_request(str(error) or "the engine cannot take this request").response()

    install_error_handlers(app)
    routes = {route.path for route in app.routes}
    app.add_middleware(
        Gate,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        routes=routes,
        responses=app.state.responses,
    )
    return app


def display_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(engine: Any, settings: ServerSettings) -> None:
    """Start the engine and serve it until interrupted (Ctrl-C or SIGTERM, then a normal
    return); print the URL once listening."""
    import uvicorn

    # The engine thread and the event loop share one interpreter lock; at Python's default 5 ms
    # switch interval a thread that wants it back waits up to a whole decode step. Hand it over
    # more often (SLICESERVE_SWITCH_INTERVAL seconds).
    sys.setswitchinterval(float(os.environ.get("SLICESERVE_SWITCH_INTERVAL", "0.0005")))
    app = create_app(engine, settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="info", lifespan="off", timeout_graceful_shutdown=5
        )
    )

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
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: that is a normal stop
        pass
    finally:
        engine.shutdown()
