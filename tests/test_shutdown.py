"""SIGTERM and Ctrl-C with streams running, against a real `sliceserve serve` process.

Every stream ends with a final chunk (finish_reason) or an error event, then `data: [DONE]`;
requests arriving meanwhile get 503; the engine stops and is shut down; the process exits with
0 within the grace period, with no traceback. The tiny model decodes a few hundred tokens a
second per stream here, so 1000 tokens outlast a 1 s grace period and 200 fit well within 30 s.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from cli_support import served_url
from server_support import Stream, checkpoint_path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return checkpoint_path(tmp_path_factory)


@contextmanager
def serving(checkpoint: Path, grace: float):
    """A `sliceserve serve` process on a free port; yields (process, base URL)."""
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "sliceserve", "serve", str(checkpoint), "--port", "0"]
    command += ["--max-model-len", "1024", "--max-batch", "8", "--shutdown-grace", str(grace)]
    pipes = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process = subprocess.Popen(command, text=True, env=env, **pipes)
    try:
        yield process, served_url(process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def start_streams(url: str, count: int, max_tokens: int) -> list[Stream]:
    streams = [Stream(url, max_tokens) for _ in range(count)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(30)
    return streams


def post_whole(url: str, max_tokens: int) -> httpx.Response:
    # greedy and ignore_eos: it must run its max_tokens (a sampled draw reached eos after 78 in CI)
    body = {"prompt": "ka", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def wait_until_running(url: str, count: int) -> None:
    """Until the engine holds `count` requests (its /metrics gauge)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(url + "/metrics", timeout=10).text
        if re.search(rf"^sliceserve_requests_running {count}$", metrics, re.M):
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine never held {count} requests")


def finish(process: subprocess.Popen, streams: list[Stream], within: float) -> str:
    """Wait for the streams and the process; return its stderr after checking the exit."""
    started = time.monotonic()
    for stream in streams:
        stream.join(timeout=within)
        assert not stream.is_alive(), "a stream was left open"
    _, stderr = process.communicate(timeout=within)
    assert time.monotonic() - started < within
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
    assert "engine stopped" in stderr, stderr  # engine.shutdown() ran
    return stderr


def assert_refused_while_draining(url: str) -> None:
    response = httpx.post(url + "/v1/completions", json={"prompt": "ka", "max_tokens": 2}, timeout=10)
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert httpx.get(url + "/health", timeout=10).status_code == 503  # load balancers take it out


def test_sigterm_ends_every_stream_with_an_error_event_and_done(checkpoint: Path):
    with serving(checkpoint, grace=1) as (process, url):
        streams = start_streams(url, 4, max_tokens=1000)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        chunks = client.completions.create(model=None, prompt="kalo", max_tokens=1000, stream=True, temperature=0)
        next(iter(chunks))
        whole: dict = {}
        request = threading.Thread(target=lambda: whole.update(response=post_whole(url, 1000)))
        request.start()
        wait_until_running(url, 6)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert_refused_while_draining(url)
        with pytest.raises(openai.APIError) as caught:  # the error event, not a cut connection
            for _ in chunks:
                pass
        assert not isinstance(caught.value, openai.APIConnectionError)
        assert "shutting down" in str(caught.value)
        stderr = finish(process, streams, within=20)
        assert time.monotonic() - sent < 1 + 6  # the grace period, then a quick exit
        request.join(timeout=10)
    assert whole["response"].status_code == 503, whole["response"].text  # a whole answer cut short
    assert whole["response"].json()["error"]["code"] == "cancelled"
    for stream in streams:
        error_event, done = stream.last_two()
        assert '"code":"cancelled"' in error_event and "shutting down" in error_event
        assert done == "data: [DONE]"
    assert "SIGTERM: shutting down" in stderr


def test_sigint_lets_running_requests_finish_within_the_grace(checkpoint: Path):
    with serving(checkpoint, grace=30) as (process, url):
        streams = start_streams(url, 4, max_tokens=200)
        whole: dict = {}
        request = threading.Thread(target=lambda: whole.update(response=post_whole(url, 200)))
        request.start()
        wait_until_running(url, 5)
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        assert_refused_while_draining(url)
        finish(process, streams, within=30)
        request.join(timeout=30)
        assert time.monotonic() - sent < 15  # it waited for the requests, not for the whole grace
    for stream in streams:
        final, done = stream.last_two()
        assert '"finish_reason":"length"' in final and done == "data: [DONE]"
    assert whole["response"].json()["choices"][0]["finish_reason"] == "length", whole["response"].text


def test_a_second_signal_ends_the_requests_at_once(checkpoint: Path):
    with serving(checkpoint, grace=60) as (process, url):
        streams = start_streams(url, 2, max_tokens=1000)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        stderr = finish(process, streams, within=20)
        assert time.monotonic() - sent < 10
    for stream in streams:
        error_event, done = stream.last_two()
        assert '"code":"cancelled"' in error_event and done == "data: [DONE]"
    assert "SIGINT again" in stderr
