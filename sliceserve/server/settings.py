"""How the HTTP server is set up: where it listens, who may call it, what it accepts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"  # local only unless told otherwise
    port: int = 8000
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"
    max_body_bytes: int = 1 << 20
    model_name: str = "sliceserve"  # the one model id that /v1/models lists and requests must name
    max_choices: int = 16  # n times the number of prompts, per request
