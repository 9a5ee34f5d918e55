"""Bodies that once reached a 500: JSON nested deeper than the parser's recursion, a client that
declares a Content-Length and closes, a chunked body with a broken chunk size. Each gets a 4xx
(or, when nobody is left to answer, a quiet close counted as 499), never a 500 in /metrics and
never a traceback in the server's log; the server keeps serving. Real sockets, a real server.
"""

from __future__ import annotations

import logging
import re
import socket
import time

import httpx
import pytest
from server_support import checkpoint_path, start_server

from sliceserve.engine.loading import load_engine

GOOD_BODIES = {
    "/v1/completions": {"prompt": "kalo", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "ka"}], "max_tokens": 2},
}
ROUTES = list(GOOD_BODIES)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = load_engine(checkpoint_path(tmp_path_factory), max_batch=2, max_model_len=128)
    with start_server(engine, model_name="tiny") as running:
        yield running


@pytest.fixture
def server_log():
    """What uvicorn and the app log meanwhile (uvicorn's loggers do not propagate to the root)."""
    records = Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "sliceserve")]
    for logger in loggers:
        logger.addHandler(records)
    yield records
    for logger in loggers:
        logger.removeHandler(records)


def responses_by_status(server) -> dict[tuple[str, int], int]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    found = re.findall(r'^sliceserve_http_responses_total\{route="([^"]+)",status="(\d+)"\} (\d+)$', text, re.M)
    return {(route, int(status)): int(count) for route, status, count in found}


def assert_no_tracebacks(log: Records) -> None:
    failures = [r for r in log.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]


def raw_exchange(server, data: bytes, *, close_after_send: bool = False, timeout: float = 10) -> bytes:
    """Send `data` on a fresh connection; return whatever comes back until the server closes."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if close_after_send:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return received


def request_head(route: str, extra: str) -> bytes:
    return f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("depth", [990, 20000])
def test_deeply_nested_json_is_a_400(server, server_log, route: str, depth: int):
    for body in ("[" * depth + "]" * depth, '{"prompt": ' + "[" * depth + "]" * depth + "}"):
        response = httpx.post(server.url + route, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert "nests" in response.json()["error"]["message"]
    assert_no_tracebacks(server_log)


def test_nesting_just_below_the_parsers_limit_is_a_400_too(server, server_log):
    """900 levels parse, but validating or re-encoding them would recurse as deep: refused by depth."""
    messages = '[{"role": "user", "content": ' + "[" * 900 + "]" * 900 + "}]"
    response = httpx.post(
        server.url + "/v1/chat/completions",
        content='{"messages": ' + messages + "}",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400 and "32 levels" in response.json()["error"]["message"]
    assert_no_tracebacks(server_log)


def test_a_body_cut_short_is_no_server_error(server, server_log):
    before = responses_by_status(server)
    head = request_head("/v1/completions", "Content-Length: 100000\r\n")
    raw_exchange(server, head + b'{"prompt": "ka', close_after_send=True)
    deadline = time.monotonic() + 10
    while True:  # until the app has seen the disconnect and counted the request
        after = responses_by_status(server)
        counted = {key: after.get(key, 0) - before.get(key, 0) for key in after}
        if counted.get(("/v1/completions", 499)) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counted.get(("/v1/completions", 499)) == 1, counted
    assert not any(status >= 500 for (_, status), n in counted.items() if n), counted
    assert_no_tracebacks(server_log)


@pytest.mark.parametrize("chunk", [b"zz\r\n{}\r\n0\r\n\r\n", b"5\r\n{}\r\n0\r\n\r\n", b"-1\r\n{}\r\n"])
def test_a_broken_chunked_body_is_a_400(server, server_log, chunk: bytes):
    before = responses_by_status(server)
    head = request_head("/v1/completions", "Transfer-Encoding: chunked\r\n")
    answer = raw_exchange(server, head + chunk)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    time.sleep(0.3)
    after = responses_by_status(server)
    counted = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    assert not any(status >= 500 for (_, status), n in counted.items() if n), counted
    assert_no_tracebacks(server_log)


def test_the_server_still_serves_and_never_counted_a_500(server):
    for route, body in GOOD_BODIES.items():
        assert httpx.post(server.url + route, json=body, timeout=30).status_code == 200
    assert not any(status >= 500 for (_, status) in responses_by_status(server)), responses_by_status(server)
