"""The OpenAI-compatible server end to end: a real uvicorn server over the real engine and
a tiny sliced checkpoint, driven with the `openai` client (and httpx for raw streams)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from server_support import checkpoint_path, plain_greedy, start_server

from sliceserve.engine.loading import load_engine

MODEL = "tiny-sliced"
MAX_MODEL_LEN = 1024  # long enough that the disconnect test's streams cannot end on their own
PROMPTS = [
    "kalo",
    "mira tensul",
    "ve an dis po que",
    "stra ni el bu ka lo mi",
    "ra",
    "sul or ve an",
    "dis po que stra ni el bu ka lo mi ra ten sul",
    "tensul kalo",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = load_engine(checkpoint_path(tmp_path_factory), max_batch=8, max_model_len=MAX_MODEL_LEN)
    with start_server(engine, model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(server):
    return server.engine.tokenizer


def complete(client, prompt: str, **kwargs):
    return client.completions.create(model=MODEL, prompt=prompt, **{"max_tokens": 8, "temperature": 0, **kwargs})


def chat(client, content: str, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **{"max_tokens": 8, "temperature": 0, **kwargs}
    )


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_greedy_completion_matches_the_plain_model_and_counts_usage(server, client, tokenizer):
    prompt = "mira tensul kalo"
    result = complete(client, prompt, max_tokens=10)
    prompt_ids = tokenizer(prompt)["input_ids"]
    expected = tokenizer.decode(plain_greedy(server.engine.model, prompt_ids, 10), skip_special_tokens=True)
    assert result.object == "text_completion" and result.model == MODEL
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt_ids), 10)
    assert result.usage.total_tokens == len(prompt_ids) + 10


def test_chat_uses_the_chat_template(server, client, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "kalo mira"}]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    prompt_ids = list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    expected = tokenizer.decode(plain_greedy(server.engine.model, prompt_ids, 6), skip_special_tokens=True)
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt_ids), 6)
    # text parts are joined into one content string
    parts = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "kalo "}, {"type": "text", "text": "mira"}]},
    ]
    same = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=6, temperature=0)
    assert same.choices[0].message.content == expected


def test_completion_stream_reassembles_the_whole_answer(client):
    whole = complete(client, "ve an dis", max_tokens=12)
    chunks = list(complete(client, "ve an dis", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_chat_stream_sends_role_then_content(client):
    whole = chat(client, "stra ni", max_tokens=10)
    chunks = list(chat(client, "stra ni", max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    content_chunks = [c for c in chunks if c.choices]
    assert all(c.choices[0].delta.role is None for c in content_chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == whole.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_raw_event_stream_format(server):
    body = {"model": MODEL, "prompt": "kalo", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event.removeprefix("data: "))["object"] == "text_completion"


def test_stop_strings_end_the_text_before_them(client):
    full = complete(client, "sul or", max_tokens=16).choices[0].text
    stop = full[6:9]
    cut = full[: full.find(stop)]
    for stops in (stop, ["zzzz", stop]):
        result = complete(client, "sul or", max_tokens=16, stop=stops)
        assert result.choices[0].text == cut
        assert result.choices[0].finish_reason == "stop"
    streamed = complete(client, "sul or", max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut
    chat_full = chat(client, "sul or", max_tokens=16).choices[0].message.content
    chat_stop = chat_full[5:8]
    result = chat(client, "sul or", max_tokens=16, stop=[chat_stop])
    assert result.choices[0].message.content == chat_full[: chat_full.find(chat_stop)]
    assert result.choices[0].finish_reason == "stop"


def test_seed_reproduces_and_n_uses_consecutive_seeds(client):
    def sample(seed: int, **kwargs):
        return complete(client, "kalo mira", max_tokens=12, temperature=1.0, seed=seed, **kwargs)

    first, again = sample(7), sample(7)
    assert first.choices[0].text == again.choices[0].text
    assert len({sample(seed).choices[0].text for seed in range(1, 6)}) >= 2
    several = sample(7, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.text for c in several.choices] == [sample(7 + i).choices[0].text for i in range(3)]
    assert several.usage.prompt_tokens == first.usage.prompt_tokens  # the prompt is counted once
    assert several.usage.completion_tokens == sum(sample(7 + i).usage.completion_tokens for i in range(3))
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "kalo"}],
        max_tokens=8,
        temperature=1.0,
        seed=3,
        n=2,
        stream=True,
    )
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    for i in range(2):
        single = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "kalo"}], max_tokens=8, temperature=1.0, seed=3 + i
        )
        assert texts[i] == single.choices[0].message.content


def test_several_prompts_in_one_completion_request(client, tokenizer):
    result = client.completions.create(model=MODEL, prompt=["kalo", "mira tensul"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.choices[0].text == result.choices[1].text == complete(client, "kalo", max_tokens=4).choices[0].text
    assert result.choices[2].text == complete(client, "mira tensul", max_tokens=4).choices[0].text
    prompt_tokens = len(tokenizer("kalo")["input_ids"]) + len(tokenizer("mira tensul")["input_ids"])
    assert result.usage.prompt_tokens == prompt_tokens
    ids = tokenizer("mira tensul")["input_ids"]
    assert complete(client, ids, max_tokens=4).choices[0].text == result.choices[2].text  # token ids as the prompt


def test_completion_logprobs(client):
    result = complete(client, "el bu ka", max_tokens=6, logprobs=3)
    choice = result.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and all(v <= 0 for v in top.values())
        assert logprob == pytest.approx(max(top.values()))  # greedy takes the most likely token
        assert top[token] == pytest.approx(logprob)
    assert complete(client, "el bu ka", max_tokens=6).choices[0].logprobs is None


def test_chat_logprobs(client):
    result = chat(client, "el bu ka", max_tokens=5, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(entry.token for entry in content) == result.choices[0].message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    assert chat(client, "el bu ka", max_tokens=5, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []
    assert chat(client, "el bu ka", max_tokens=5).choices[0].logprobs is None


def test_concurrent_requests_give_the_same_texts_as_one_by_one(server):
    lengths = [4, 9, 6, 12, 5, 10, 7, 8]

    async def run(concurrently: bool) -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
            calls = [
                lambda p=p, n=n: client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
                for p, n in zip(PROMPTS, lengths)
            ]
            if concurrently:
                results = await asyncio.gather(*(call() for call in calls))
            else:
                results = [await call() for call in calls]
        return [r.choices[0].text for r in results]

    one_by_one = asyncio.run(run(False))
    assert asyncio.run(run(True)) == one_by_one
    assert len(set(one_by_one)) == len(PROMPTS)


def engine_state(engine) -> tuple[int, int, int, int]:
    stats = engine.stats
    with stats.lock:
        return stats.running, stats.waiting, stats.kv_slots_used, stats.finished["cancelled"]


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_disconnected_streams_free_their_slots(server):
    """10 streams on 8 slots: 8 running, 2 waiting (no headers yet). Closing every connection
    must cancel all 10 engine requests and free every KV slot."""
    cancelled_before = engine_state(server.engine)[3]
    body = {"model": MODEL, "prompt": "kalo mira", "max_tokens": 1000, "temperature": 0, "stream": True}

    async def open_and_read(client: httpx.AsyncClient, read: asyncio.Event) -> None:
        async with client.stream("POST", server.base_url + "/completions", json=body) as response:
            assert response.status_code == 200
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks == 2:
                    read.set()
                    await asyncio.sleep(3600)  # hold the connection until cancelled

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as client:
            events = [asyncio.Event() for _ in range(10)]
            tasks = [asyncio.create_task(open_and_read(client, e)) for e in events]
            deadline = time.monotonic() + 20
            while sum(e.is_set() for e in events) < 8 or engine_state(server.engine)[:2] != (8, 2):
                assert time.monotonic() < deadline, engine_state(server.engine)
                await asyncio.sleep(0.02)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # a fresh loop whose tasks all end: the test then waits on the engine from outside
    asyncio.run(scenario())
    deadline = time.monotonic() + 5
    while engine_state(server.engine) != (0, 0, 0, cancelled_before + 10):
        assert time.monotonic() < deadline, f"engine state {engine_state(server.engine)}"
        time.sleep(0.02)
    assert metric(server, "sliceserve_requests_running") == 0
    assert metric(server, "sliceserve_requests_waiting") == 0
    assert metric(server, "sliceserve_kv_cache_slots_used") == 0
    assert complete(openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0), "kalo").choices[0].text


def test_a_client_leaving_a_whole_answer_cancels_it(server):
    cancelled_before = engine_state(server.engine)[3]
    body = {"model": MODEL, "prompt": "kalo", "max_tokens": 1000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 5
    while engine_state(server.engine) != (0, 0, 0, cancelled_before + 1):
        assert time.monotonic() < deadline, f"engine state {engine_state(server.engine)}"
        time.sleep(0.02)


def test_serve_prints_its_url_and_stops_on_interrupt(server, tmp_path_factory):
    code = (
        "import sys; from sliceserve.engine.loading import load_engine; "
        "from sliceserve.server import ServerSettings, serve; "
        "serve(load_engine(sys.argv[1], max_model_len=64), ServerSettings(port=0, model_name='m'))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(checkpoint_path(tmp_path_factory))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = process.stdout.readline()
        match = re.search(r"serving m at (http://127\.0\.0\.1:\d+)/v1", line)
        assert match, line
        assert httpx.get(match.group(1) + "/health").json() == {"status": "ok"}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()


def test_metrics_report_requests_tokens_and_latencies(server, client):
    before = metric(server, "sliceserve_generation_tokens_total")
    complete(client, "kalo", max_tokens=5)
    text = httpx.get(server.url + "/metrics").text
    assert metric(server, "sliceserve_generation_tokens_total") >= before + 5
    for name in ("sliceserve_time_to_first_token_seconds", "sliceserve_inter_token_latency_seconds"):
        assert f"# TYPE {name} histogram" in text
        assert f'{name}_bucket{{le="+Inf"}}' in text
    assert 'sliceserve_requests_finished_total{reason="length"}' in text
    assert 'sliceserve_http_responses_total{route="/v1/completions",status="200"}' in text
    assert metric(server, "sliceserve_kv_cache_slots_total") == 8
