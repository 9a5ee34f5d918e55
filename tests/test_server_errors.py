"""Bad input to the server: every malformed request answered with the right status and an
OpenAI-shaped error, never a 500 and never a hang; the server keeps serving afterwards."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_support import checkpoint_path, start_server

from sliceserve.engine.loading import load_engine
from sliceserve.server import ServerSettings

MODEL = "tiny-sliced"
KEY = "test-key-123"
MAX_MODEL_LEN = 128
MAX_BODY_BYTES = 65536  # small, so an oversized body still fits the sockets' buffers (no reset while sending)
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG_PROMPT = "kalo mira tensul " * 60  # far more than MAX_MODEL_LEN tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server that wants an API key, with a short context."""
    engine = load_engine(checkpoint_path(tmp_path_factory), max_batch=2, max_model_len=MAX_MODEL_LEN)
    with start_server(engine, model_name=MODEL, api_key=KEY, max_body_bytes=MAX_BODY_BYTES) as running:
        yield running


def without_chat_template(source: Path, target: Path) -> Path:
    """A copy of the checkpoint whose tokenizer has no chat template."""
    if not target.exists():
        shutil.copytree(source, target)
        (target / "chat_template.jinja").unlink(missing_ok=True)
        config_file = target / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.pop("chat_template", None)
        config_file.write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One slot and a queue of one, for the full-queue test; its tokenizer has no chat template."""
    folder = without_chat_template(checkpoint_path(tmp_path_factory), tmp_path_factory.getbasetemp() / "no_template")
    engine = load_engine(folder, max_batch=1, max_queue=1, max_model_len=1024)
    with start_server(engine, model_name=MODEL) as running:
        yield running


def post(server, route: str, body, headers=AUTH, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server.base_url + route,
        content=content,
        timeout=30,
        headers={"Content-Type": "application/json", **headers},
        **kwargs,
    )


def assert_error(response: httpx.Response, status: int, type_: str, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "kalo", "max_tokens": 4, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "kalo"}], "max_tokens": 4, **fields}


BAD = "invalid_request_error"
CASES = [
    # (name, route, body, status, type, param)
    ("invalid JSON", "/completions", b'{"prompt": "kalo",', 400, BAD, None),
    ("JSON but not an object", "/completions", b"[1, 2]", 400, BAD, None),
    ("NaN is not JSON", "/completions", b'{"prompt": "kalo", "temperature": NaN}', 400, BAD, None),
    ("not UTF-8", "/completions", b'{"prompt": "\xff\xfe"}', 400, BAD, None),
    ("lone surrogate in the prompt", "/completions", b'{"prompt": "ka\\ud800lo"}', 400, BAD, None),
    (
        "lone surrogate in a message",
        "/chat/completions",
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        400,
        BAD,
        None,
    ),
    ("no prompt", "/completions", {"model": MODEL, "max_tokens": 4}, 400, BAD, "prompt"),
    ("negative max_tokens", "/completions", completion(max_tokens=-1), 400, BAD, "max_tokens"),
    ("zero max_tokens", "/completions", completion(max_tokens=0), 400, BAD, "max_tokens"),
    ("max_tokens a string", "/completions", completion(max_tokens="ten"), 400, BAD, "max_tokens"),
    ("max_tokens a float", "/completions", completion(max_tokens=2.5), 400, BAD, "max_tokens"),
    ("temperature above 2", "/completions", completion(temperature=2.5), 400, BAD, "temperature"),
    ("negative temperature", "/completions", completion(temperature=-0.1), 400, BAD, "temperature"),
    ("temperature a string", "/completions", completion(temperature="hot"), 400, BAD, "temperature"),
    ("top_p zero", "/completions", completion(top_p=0), 400, BAD, "top_p"),
    ("top_p above 1", "/completions", completion(top_p=1.5), 400, BAD, "top_p"),
    ("top_k below -1", "/completions", completion(top_k=-2), 400, BAD, "top_k"),
    ("n zero", "/completions", completion(n=0), 400, BAD, "n"),
    ("n too large", "/completions", completion(n=1000), 400, BAD, "n"),
    ("logprobs too many", "/completions", completion(logprobs=50), 400, BAD, "logprobs"),
    ("stop a number", "/completions", completion(stop=5), 400, BAD, "stop"),
    ("too many stop strings", "/completions", completion(stop=[f"s{i}" for i in range(20)]), 400, BAD, "stop"),
    ("empty stop string", "/completions", completion(stop=[""]), 400, BAD, "stop"),
    ("empty prompt", "/completions", completion(prompt=""), 400, BAD, "prompt"),
    ("empty prompt list", "/completions", completion(prompt=[]), 400, BAD, "prompt"),
    ("prompt mixing ids and text", "/completions", completion(prompt=[[1, 2], "x"]), 400, BAD, "prompt"),
    ("prompt of characters the tokenizer drops", "/completions", completion(prompt="\u00e9"), 400, BAD, "prompt"),
    ("token id outside the vocabulary", "/completions", completion(prompt=[5, 10**6]), 400, BAD, "prompt"),
    ("prompt longer than the context", "/completions", completion(prompt=LONG_PROMPT), 400, BAD, "prompt"),
    ("prompt plus max_tokens too long", "/completions", completion(max_tokens=MAX_MODEL_LEN), 400, BAD, "max_tokens"),
    ("negative seed", "/completions", completion(seed=-1), 400, BAD, "seed"),
    (
        "stream_options without stream",
        "/completions",
        completion(stream_options={"include_usage": True}),
        400,
        BAD,
        "stream_options",
    ),
    ("stream not a boolean", "/completions", completion(stream="yes"), 400, BAD, "stream"),
    ("suffix unsupported", "/completions", completion(suffix="x"), 400, BAD, "suffix"),
    ("unknown field", "/completions", completion(frobnicate=1), 400, BAD, "frobnicate"),
    ("presence_penalty above 2", "/completions", completion(presence_penalty=2.5), 400, BAD, "presence_penalty"),
    ("unknown model", "/completions", completion(model="gpt-4"), 404, BAD, "model"),
    ("no messages", "/chat/completions", {"model": MODEL, "max_tokens": 4}, 400, BAD, "messages"),
    ("empty messages", "/chat/completions", chat(messages=[]), 400, BAD, "messages"),
    ("messages not a list", "/chat/completions", chat(messages="hello"), 400, BAD, "messages"),
    ("unknown role", "/chat/completions", chat(messages=[{"role": "wizard", "content": "hi"}]), 400, BAD, "messages"),
    ("message without role", "/chat/completions", chat(messages=[{"content": "hi"}]), 400, BAD, "messages"),
    ("content a number", "/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400, BAD, "messages"),
    (
        "image content",
        "/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        BAD,
        "messages",
    ),
    ("top_logprobs without logprobs", "/chat/completions", chat(top_logprobs=2), 400, BAD, "top_logprobs"),
    ("top_logprobs too many", "/chat/completions", chat(logprobs=True, top_logprobs=99), 400, BAD, "top_logprobs"),
    (
        "negative max_completion_tokens",
        "/chat/completions",
        chat(max_completion_tokens=-5),
        400,
        BAD,
        "max_completion_tokens",
    ),
    (
        "chat longer than the context",
        "/chat/completions",
        chat(messages=[{"role": "user", "content": LONG_PROMPT}]),
        400,
        BAD,
        "messages",
    ),
    ("chat temperature out of range", "/chat/completions", chat(temperature=3), 400, BAD, "temperature"),
    ("tools unsupported", "/chat/completions", chat(tools=[{"type": "function"}]), 400, BAD, "tools"),
    ("unknown model in chat", "/chat/completions", chat(model="nope"), 404, BAD, "model"),
]


@pytest.mark.parametrize("name, route, body, status, type_, param", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, name, route, body, status, type_, param):
    error = assert_error(post(server, route, body), status, type_)
    if param is not None:
        assert error["param"] is not None and error["param"].split(".")[0] == param, error


def test_bad_requests_leave_the_server_working(server):
    for _, route, body, *_ in CASES:
        post(server, route, body)
    for stream in (False, True):
        response = post(server, "/completions", completion(temperature=0, stream=stream))
        assert response.status_code == 200
    deadline = time.monotonic() + 5
    while True:  # the engine updates its gauges after the step that sent the last event
        with server.engine.stats.lock:
            running, errors = server.engine.stats.running, server.engine.stats.finished["error"]
        assert errors == 0
        if running == 0:
            break
        assert time.monotonic() < deadline, "requests still running"
        time.sleep(0.01)


def test_tiny_temperatures_are_greedy_not_a_failure(server):
    greedy = post(server, "/completions", completion(temperature=0, max_tokens=6)).json()["choices"][0]["text"]
    for temperature in (1e-300, 1e-9):
        response = post(server, "/completions", completion(temperature=temperature, max_tokens=6))
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == greedy


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/v1/nothing", 404),
        ("POST", "/v2/completions", 404),
        ("GET", "/v1/models/gpt-4", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ],
)
def test_unknown_routes_and_methods(server, method, path, status):
    response = httpx.request(method, server.url + path, headers=AUTH)
    assert_error(response, status, BAD)


def test_api_key_is_required_everywhere_but_health(server):
    assert httpx.get(server.url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        assert_error(post(server, "/completions", completion(), headers=headers), 401, "authentication_error")
        assert_error(httpx.get(server.base_url + "/models", headers=headers), 401, "authentication_error")
        assert_error(httpx.get(server.url + "/metrics", headers=headers), 401, "authentication_error")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    assert (
        client.completions.create(model=MODEL, prompt="kalo", max_tokens=2, temperature=0).usage.completion_tokens == 2
    )
    assert httpx.get(server.url + "/metrics", headers=AUTH).status_code == 200


def test_defaults_are_local_and_one_mebibyte():
    settings = ServerSettings()
    assert (settings.host, settings.max_body_bytes, settings.api_key) == ("127.0.0.1", 1 << 20, None)


def test_oversized_bodies_are_refused(server):
    big = completion(prompt="kalo " * (MAX_BODY_BYTES // 4))
    assert_error(post(server, "/completions", big), 413, BAD, "request_too_large")

    def chunks():  # no Content-Length: the limit must hold on the bytes actually read
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    response = httpx.post(
        server.base_url + "/completions",
        content=chunks(),
        timeout=30,
        headers={"Content-Type": "application/json", **AUTH},
    )
    assert_error(response, 413, BAD, "request_too_large")
    assert post(server, "/completions", completion()).status_code == 200


def test_full_queue_answers_429_at_once(small_server):
    """One slot, a queue of one: a long request runs, a second waits, a third is refused."""
    server, engine = small_server, small_server.engine
    long_body = completion(prompt="kalo", max_tokens=1000, temperature=0, stream=True)
    with httpx.stream("POST", server.base_url + "/completions", json=long_body, timeout=30) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: a collected iterator would close the connection
        next(lines)  # it holds the slot
        waiting_result = {}
        waiter = threading.Thread(
            target=lambda: waiting_result.update(
                response=post(server, "/completions", completion(max_tokens=3), headers={})
            )
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while True:
            with engine.stats.lock:
                if engine.stats.waiting == 1:
                    break
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.01)
        started = time.monotonic()
        refused = post(server, "/completions", completion(max_tokens=3), headers={})
        assert time.monotonic() - started < 2
        assert_error(refused, 429, "rate_limit_exceeded", "queue_full")
        streamed = post(server, "/completions", completion(max_tokens=3, stream=True), headers={})
        assert_error(streamed, 429, "rate_limit_exceeded", "queue_full")  # a status, not an in-stream error
    # closing the long stream frees the slot: the waiting request then completes
    waiter.join(timeout=20)
    assert waiting_result["response"].status_code == 200
    assert post(server, "/completions", completion(max_tokens=3), headers={}).status_code == 200


def test_chat_without_a_chat_template_is_a_clear_400(small_server):
    error = assert_error(post(small_server, "/chat/completions", chat(), headers={}), 400, BAD, "no_chat_template")
    assert "chat template" in error["message"]
