"""The engine in its own process (engine/engine_process.py): real child processes, real HTTP.

One child serves most tests (spawning costs a torch import, ~3 s), next to an in-process engine
over the same checkpoint with the same settings; the answers must match token for token, and the
rejections word for word. The child is killed in a test of its own, and `sliceserve serve` (the
engine process is its default) is run and signalled as an operator would.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from cli_support import meaningful_lines, run_sliceserve, served_url
from server_support import Stream, checkpoint_path, start_server

from sliceserve.engine.engine import QueueFull, RequestRejected, ShuttingDown
from sliceserve.engine.engine_child import PipeLoop
from sliceserve.engine.engine_process import EngineProcess
from sliceserve.engine.loading import load_engine
from sliceserve.engine.requests import SamplingParams
from sliceserve.errors import SliceserveError
from sliceserve.model.loader import load_tokenizer

MODEL = "tiny-sliced"
SETTINGS = dict(max_batch=2, max_queue=2, max_model_len=1024)  # two slots and a queue of two: easy to fill
PROMPTS = ["kalo", "mira tensul", "ve an dis po que", "stra ni el bu ka lo mi"]


def engine_process(path: Path, **settings) -> EngineProcess:
    return EngineProcess(
        functools.partial(load_engine, str(path), **{**SETTINGS, **settings}),
        functools.partial(load_tokenizer, str(path)),
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return checkpoint_path(tmp_path_factory)


@pytest.fixture(scope="module")
def child(checkpoint):
    with start_server(engine_process(checkpoint), model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def local(checkpoint):
    with start_server(load_engine(checkpoint, **SETTINGS), model_name=MODEL) as running:
        yield running


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=30)


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for_metric(server, name: str, value: float, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while metric(server, name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}: {metric(server, name)}"
        time.sleep(0.02)


def answers(server) -> list:
    """Greedy and seeded completions (with their token ids) and chats, one request at a time."""
    api, found = client(server), []
    for prompt in PROMPTS:
        ids = {"logprobs": 0, "extra_body": {"return_tokens_as_token_ids": True}}
        greedy = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, **ids)
        seeded = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, seed=7, n=2, **ids)
        chat = api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0
        )
        found.append([(c.text, c.logprobs.tokens, c.finish_reason) for c in greedy.choices + seeded.choices])
        found.append((chat.choices[0].message.content, chat.usage.prompt_tokens, chat.usage.completion_tokens))
    return found


def test_answers_match_the_in_process_engine(child, local):
    assert answers(child) == answers(local)
    assert child.engine.model.spec == local.engine.model.spec
    assert child.engine.max_model_len == local.engine.max_model_len


def test_a_stream_reassembles_the_whole_answer(child):
    api = client(child)
    whole = api.completions.create(model=MODEL, prompt="mira", max_tokens=20, temperature=0).choices[0].text
    chunks = api.completions.create(model=MODEL, prompt="mira", max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole


def test_closing_streams_cancels_their_requests_in_the_child(child):
    cancelled = metric(child, 'sliceserve_requests_finished_total{reason="cancelled"}')
    api = client(child)
    streams = [
        api.completions.create(model=MODEL, prompt=p, max_tokens=900, temperature=0, stream=True) for p in PROMPTS[:2]
    ]
    for stream in streams:
        next(iter(stream))
    wait_for_metric(child, "sliceserve_requests_running", 2)  # both slots held
    for stream in streams:
        stream.close()
    wait_for_metric(child, "sliceserve_requests_running", 0)
    wait_for_metric(child, 'sliceserve_requests_finished_total{reason="cancelled"}', cancelled + 2)
    assert metric(child, "sliceserve_kv_cache_slots_used") == 0
    assert api.completions.create(model=MODEL, prompt="kalo", max_tokens=3).choices[0].finish_reason == "length"


def refusals(server) -> list[tuple[int, dict]]:
    too_long = {"model": MODEL, "prompt": "kalo", "max_tokens": 5000}
    empty = {"model": MODEL, "prompt": [], "max_tokens": 3}
    found = []
    for body in (too_long, empty):
        response = httpx.post(server.base_url + "/completions", json=body, timeout=10)
        found.append((response.status_code, response.json()))
    return found


def test_rejections_are_the_in_process_ones(child, local):
    assert refusals(child) == refusals(local)
    assert refusals(child)[0][0] == 400
    params = SamplingParams(max_tokens=5000)
    for prompt_ids in ([1, 2, 3], []):  # the engine's own checks: run in the child, raised here
        with pytest.raises(RequestRejected) as remote:
            next(child.engine.generate(prompt_ids, params))
        with pytest.raises(RequestRejected) as here:
            next(local.engine.generate(prompt_ids, params))
        assert type(remote.value) is type(here.value) and str(remote.value) == str(here.value)


def test_a_full_queue_is_refused_with_the_engines_message(child):
    engine, params = child.engine, SamplingParams(max_tokens=900, ignore_eos=True)
    running = [engine.generate([5, 6], params) for _ in range(2)]
    for events in running:
        next(events)  # both slots held
    waiting = [threading.Thread(target=lambda: list(engine.generate([5], SamplingParams(max_tokens=2)))) for _ in "ab"]
    for thread in waiting:
        thread.start()
    wait_for_metric(child, "sliceserve_requests_waiting", 2)
    with pytest.raises(QueueFull, match="^2 requests are already waiting$"):
        next(engine.generate([5], SamplingParams(max_tokens=2)))
    response = httpx.post(child.base_url + "/completions", json={"prompt": "ka", "max_tokens": 2}, timeout=10)
    assert response.status_code == 429
    for events in running:
        events.close()  # cancels them: the waiting request then runs
    for thread in waiting:
        thread.join(timeout=20)
        assert not thread.is_alive()


def test_each_engine_step_leaves_in_one_message(checkpoint):
    """PipeLoop against an in-process engine: three requests decoding together share messages."""
    messages = []
    loop = PipeLoop(messages.append)
    engine = load_engine(checkpoint, max_batch=4, max_model_len=256)
    done = threading.Event()
    finished = []

    def collect(request_id):
        note = loop.collector(request_id)

        def on_event(event):
            note(event)
            if event.finished:
                finished.append(request_id)
                if len(finished) == 3:
                    done.set()

        return on_event

    for request_id in range(3):
        engine.submit([5, 6, 7], SamplingParams(max_tokens=10, temperature=0), collect(request_id), loop=loop)
    engine.start()
    assert done.wait(30)
    engine.shutdown()
    assert all(kind == "events" for kind, _ in messages)
    events = [item for _, batch in messages for item in batch]
    assert sorted({request_id for request_id, _ in events}) == [0, 1, 2]
    assert len(events) == 30  # ten tokens each, the last one with its finish
    assert len(messages) <= 12 and max(len(batch) for _, batch in messages) == 3


def test_a_killed_child_ends_open_streams_with_an_error_and_refuses_new_requests(checkpoint):
    server = start_server(engine_process(checkpoint), model_name=MODEL)
    try:
        api = client(server)
        stream = api.completions.create(model=MODEL, prompt="kalo", max_tokens=900, temperature=0, stream=True)
        chunks = iter(stream)
        next(chunks)
        killed = time.monotonic()
        os.kill(server.engine.pid, signal.SIGKILL)
        with pytest.raises(openai.APIError) as caught:  # an error event, not a cut connection
            for _ in chunks:
                pass
        assert not isinstance(caught.value, openai.APIConnectionError)
        assert "engine process died (killed by SIGKILL)" in str(caught.value)
        response = httpx.post(server.base_url + "/completions", json={"prompt": "ka", "max_tokens": 2}, timeout=5)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_dead"
        assert "killed by SIGKILL" in response.json()["error"]["message"]
        assert httpx.get(server.url + "/health", timeout=5).status_code == 503
        assert metric(server, "sliceserve_requests_running") == 0
        with pytest.raises(ShuttingDown):
            next(server.engine.generate([5], SamplingParams(max_tokens=2)))
        assert time.monotonic() - killed < 5
    finally:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5


def test_a_bad_checkpoint_fails_with_the_in_process_message(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(SliceserveError) as here:
        load_engine(folder)
    started = time.monotonic()
    with pytest.raises(SliceserveError) as remote:
        engine_process(folder)
    assert str(remote.value) == str(here.value)
    assert time.monotonic() - started < 30


def test_the_cli_reports_a_bad_path_in_one_line_as_in_process(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(SliceserveError) as here:
        load_engine(missing)
    result = run_sliceserve("serve", missing, "--port", "0", cwd=tmp_path)  # the engine process by default
    assert result.returncode == 2 and meaningful_lines(result.stderr) == [f"sliceserve: error: {here.value}"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_drains_when_its_whole_process_group_is_signalled(checkpoint, sig):
    """As Ctrl-C in a terminal (SIGINT) or a service manager (SIGTERM) signals every process: the
    child ignores it, the server drains (the running stream finishes), and both exit."""
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "sliceserve", "serve", str(checkpoint), "--port", "0"]
    command += ["--max-model-len", "1024", "--shutdown-grace", "30"]
    pipes = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process = subprocess.Popen(command, text=True, env=env, start_new_session=True, **pipes)
    try:
        url = served_url(process)
        whole = httpx.post(
            url + "/v1/completions", json={"prompt": "ka", "max_tokens": 4, "temperature": 0}, timeout=30
        ).json()
        assert whole["choices"][0]["finish_reason"] == "length"
        stream = Stream(url, max_tokens=150)
        stream.start()
        assert stream.started.wait(30)
        os.killpg(process.pid, sig)
        stream.join(timeout=30)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "engine stopped" in stderr, stderr
    assert '"finish_reason":"length"' in stream.lines[-2] and stream.lines[-1] == "data: [DONE]", stream.lines[-3:]
    pid = int(re.search(r"engine runs in its own process \(pid (\d+)\)", stderr).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
