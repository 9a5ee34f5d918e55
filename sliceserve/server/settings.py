"""How the HTTP server is set up: where it listens, who may call it, what it accepts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"  # local only unless told otherwise
    port: int = 8000
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"
    max_body_bytes: int = 1 << 20
    # Without an API key, a web page open in the user's browser could call the server: it can
    # send JSON only as a "simple" request (text/plain, forms), and read answers only through
    # DNS rebinding (its own name resolving to us). So, when api_key is None, bodies must be
    # 'Content-Type: application/json' (415 otherwise; browsers ask first for that, and we never
    # allow it), and the Host header must be an IP address, localhost, the bound host or one
    # of allowed_hosts ("*": any).
    allowed_hosts: tuple[str, ...] = ()
    model_name: str = "sliceserve"  # the one model id that /v1/models lists and requests must name
    max_choices: int = 16  # n times the number of prompts, per request
    # Slow or stalled clients: a connection must send a request's headers within header_timeout
    # seconds (from its opening, or from its first byte after an answer) and its body within
    # body_timeout (408), and is closed when idle keep_alive_timeout seconds after an answer;
    # past max_connections open connections (or running requests) new requests get 503.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: int = 5
    max_connections: int = 1024
    # On SIGTERM or SIGINT: new requests get 503 and running ones this many seconds to finish;
    # then the engine ends what is left (an error event, then [DONE]) and the process exits.
    shutdown_grace: float = 5.0
