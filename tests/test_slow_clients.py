"""Slow and stalled clients, over real sockets against a real server on 127.0.0.1: connections
that never finish their headers (or trickle them) are closed at the header deadline, a body that
never arrives gets 408, idle connections are closed after keep-alive, and past the connection
cap new requests get 503; meanwhile, and afterwards, other clients are served at once.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from server_support import checkpoint_path, start_server

from sliceserve.engine.loading import load_engine

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE = 1
PARTIAL_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def start(tmp_path_factory, **settings):
    engine = load_engine(checkpoint_path(tmp_path_factory), max_batch=2, max_model_len=128)
    return start_server(
        engine,
        model_name="tiny",
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        keep_alive_timeout=KEEP_ALIVE,
        **settings,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start(tmp_path_factory, max_connections=256) as running:
        yield running


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory):
    with start(tmp_path_factory, max_connections=6) as running:
        yield running


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_after(sock: socket.socket, limit: float = 10) -> tuple[float, bytes]:
    """Seconds until the server closes `sock` (reading whatever it sends), and what it sent."""
    started, received = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return time.monotonic() - started, received


def served_quickly(server, within: float = 5.0) -> None:
    started = time.monotonic()
    response = httpx.post(server.base_url + "/completions", json={"prompt": "kalo", "max_tokens": 2}, timeout=within)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < within


def test_unfinished_headers_are_closed_and_others_served(server):
    opened = time.monotonic()
    silent = [connect(server) for _ in range(10)]  # not a byte
    partial = [connect(server) for _ in range(10)]  # headers begun, never ended
    for sock in partial:
        sock.sendall(PARTIAL_HEAD)
    for _ in range(3):  # the stalled connections take nothing from the others
        served_quickly(server)
    for sock in silent + partial:
        seconds, received = closed_after(sock)
        assert received == b""  # closed without an answer, as uvicorn's keep-alive timeout does
        sock.close()
    elapsed = time.monotonic() - opened
    assert HEADER_TIMEOUT * 0.9 < elapsed < HEADER_TIMEOUT + 3, elapsed
    served_quickly(server)


def test_trickled_headers_are_closed_at_the_deadline(server):
    """A slowloris client sends a byte every 0.2 s: never idle, still closed."""
    sock = connect(server)
    opened, closed = time.monotonic(), threading.Event()

    def trickle() -> None:
        for byte in PARTIAL_HEAD * 10:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if closed.wait(0.2):
                break

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    closed_after(sock)
    closed.set()
    sender.join(timeout=5)
    sock.close()
    assert time.monotonic() - opened < HEADER_TIMEOUT + 3


def test_a_body_that_never_arrives_gets_408(server):
    sock = connect(server)
    sock.sendall(PARTIAL_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"prompt":')
    seconds, received = closed_after(sock)
    sock.close()
    assert received.startswith(b"HTTP/1.1 408"), received
    assert b'"code":"request_timeout"' in received
    assert BODY_TIMEOUT * 0.9 < seconds < BODY_TIMEOUT + 3


def test_an_idle_connection_is_closed_after_keep_alive(server):
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    seconds, received = closed_after(sock)
    sock.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert seconds < KEEP_ALIVE + 3


def test_past_the_connection_cap_new_requests_get_503_until_the_stalled_ones_are_closed(capped_server):
    stalled = [connect(capped_server) for _ in range(6)]
    for sock in stalled:
        sock.sendall(PARTIAL_HEAD)
    time.sleep(0.2)
    refused = httpx.get(capped_server.url + "/health", timeout=5)
    assert refused.status_code == 503
    for sock in stalled:
        closed_after(sock)
        sock.close()
    time.sleep(0.1)
    served_quickly(capped_server)
