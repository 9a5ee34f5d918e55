"""Prompt scoring over real HTTP: echo, prompt logprobs (OpenAI's shape and vLLM's
prompt_logprobs), as lm-evaluation-harness's local-completions asks for them, against the
log_softmax of the reference model's full-sequence logits.

The server prefills in chunks of 8 tokens, so every scored prompt here spans several chunks
(and several engine steps), batched with whatever else the engine runs."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from server_support import checkpoint_path, start_server

from sliceserve.engine.loading import load_engine

MODEL = "tiny-sliced"
CHUNK = 8
TEXTS = [
    "kalo mira tensul ve an dis po que stra ni el bu ka lo mi ra ten sul or ve an dis po que stra ni el bu",
    "sul or ve an dis po que stra ni el bu ka lo mi ra ten sul kalo mira tensul",
    "ve an dis po que stra ni el bu ka lo mi ra ten sul or ve an dis po que",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = load_engine(checkpoint_path(tmp_path_factory), max_batch=4, max_model_len=256, prefill_chunk=CHUNK)
    with start_server(engine, model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def tokenizer(server):
    return server.engine.tokenizer


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def post(server, body: dict) -> dict:
    response = httpx.post(server.base_url + "/completions", json={"model": MODEL, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def reference_logprobs(server, ids: list[int]) -> torch.Tensor:
    """(T, vocab): log_softmax in float32 of the reference model's logits over the whole prompt."""
    with torch.inference_mode():
        return server.engine.model(torch.tensor([ids]))[0].float().log_softmax(dim=-1)


def check_scores(server, ids: list[int], token_logprobs: list, top_logprobs: list | None, top: int) -> None:
    reference = reference_logprobs(server, ids)
    assert token_logprobs[0] is None
    expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(token_logprobs[1 : len(ids)], dtype=torch.float32), expected, atol=1e-5)
    if top_logprobs is None:
        return
    assert top_logprobs[0] is None
    for position, alternatives in enumerate(top_logprobs[1 : len(ids)]):
        values = torch.tensor(sorted(alternatives.values(), reverse=True))
        assert len(alternatives) == top
        assert torch.allclose(values, reference[position].topk(top).values, atol=1e-5)


def test_lm_eval_request_scores_the_prompt(server, tokenizer):
    """lm-eval's loglikelihood request: token ids, one generated token, logprobs 1, echo."""
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert len(ids) > 3 * CHUNK
    result = post(server, {"prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, "seed": 1})
    choice = result["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(ids) + 1
    check_scores(server, ids, logprobs["token_logprobs"], logprobs["top_logprobs"], 1)
    assert logprobs["tokens"][: len(ids)] == [tokenizer.decode([t]) for t in ids]
    # the generated token follows: the greedy choice after the whole prompt
    assert logprobs["token_logprobs"][-1] == pytest.approx(max(logprobs["top_logprobs"][-1].values()), abs=1e-6)
    prompt_text = tokenizer.decode(ids)
    assert choice["text"].startswith(prompt_text) and len(choice["text"]) > len(prompt_text)
    assert logprobs["text_offset"] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))] + [len(prompt_text)]
    assert result["usage"]["prompt_tokens"] == len(ids) and result["usage"]["completion_tokens"] == 1


def test_echo_with_zero_max_tokens_returns_the_prompt_only(server, tokenizer):
    """The older lm-eval form: max_tokens 0; several prompts in one request, scored together."""
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    result = post(server, {"prompt": prompts, "max_tokens": 0, "logprobs": 2, "echo": True})
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    for ids, choice in zip(prompts, result["choices"]):
        assert choice["text"] == tokenizer.decode(ids)
        assert choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["tokens"]) == len(ids)
        check_scores(server, ids, choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"], 2)
    assert result["usage"]["completion_tokens"] == 0
    assert result["usage"]["prompt_tokens"] == sum(len(ids) for ids in prompts)
    # a text prompt echoes as sent, and scores as its token ids do
    text = post(server, {"prompt": TEXTS[1], "max_tokens": 0, "logprobs": 0, "echo": True})["choices"][0]
    assert text["text"] == TEXTS[1]
    assert text["logprobs"]["top_logprobs"][1:] == [{}] * (len(prompts[1]) - 1)
    check_scores(server, prompts[1], text["logprobs"]["token_logprobs"], None, 0)


def test_echo_without_logprobs_prepends_the_prompt(server):
    plain = post(server, {"prompt": TEXTS[2], "max_tokens": 6, "temperature": 0})["choices"][0]
    echoed = post(server, {"prompt": TEXTS[2], "max_tokens": 6, "temperature": 0, "echo": True})["choices"][0]
    assert echoed["text"] == TEXTS[2] + plain["text"] and echoed["logprobs"] is None
    # and the generated tokens' logprobs continue after the prompt's
    scored = post(server, {"prompt": TEXTS[2], "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 1})
    logprobs = scored["choices"][0]["logprobs"]
    generated = post(server, {"prompt": TEXTS[2], "max_tokens": 6, "temperature": 0, "logprobs": 1})
    alone = generated["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][-6:] == pytest.approx(alone["token_logprobs"], abs=1e-6)
    assert logprobs["text_offset"][-6:] == [offset + len(TEXTS[2]) for offset in alone["text_offset"]]


def test_vllm_prompt_logprobs(server, tokenizer):
    ids = tokenizer(TEXTS[1])["input_ids"]
    result = post(server, {"prompt": ids, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3})
    choice = result["choices"][0]
    assert choice["logprobs"] is None and choice["text"]  # no echo: the completion alone
    scored = choice["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    reference = reference_logprobs(server, ids)
    for position, (token, entries) in enumerate(zip(ids[1:], scored[1:])):
        own = entries[str(token)]
        assert own["logprob"] == pytest.approx(float(reference[position, token]), abs=1e-5)
        assert own["rank"] == int((reference[position] > reference[position, token]).sum()) + 1
        assert own["decoded_token"] == tokenizer.decode([token])
        top = reference[position].topk(3)
        for rank, (value, token_id) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert entries[str(token_id)]["logprob"] == pytest.approx(value, abs=1e-5)
            if token_id != token:
                assert entries[str(token_id)]["rank"] == rank
        assert len(entries) in (3, 4)  # the top 3, and the prompt's token where it is not among them
    # chat: once for the request, at the top level
    chat = httpx.post(
        server.base_url + "/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": TEXTS[0]}],
            "max_tokens": 1,
            "prompt_logprobs": 0,
        },
        timeout=60,
    ).json()
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": TEXTS[0]}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert len(chat["prompt_logprobs"]) == len(prompt_ids) and chat["prompt_logprobs"][0] is None
    reference = reference_logprobs(server, prompt_ids)
    for position, (token, entries) in enumerate(zip(prompt_ids[1:], chat["prompt_logprobs"][1:])):
        assert entries[str(token)]["logprob"] == pytest.approx(float(reference[position, token]), abs=1e-5)


def test_the_openai_client_scores_prompts(client, server, tokenizer):
    ids = tokenizer(TEXTS[0])["input_ids"]
    result = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0)
    logprobs = result.choices[0].logprobs
    check_scores(server, ids, logprobs.token_logprobs, logprobs.top_logprobs, 1)
    only = client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == TEXTS[0] and only.usage.completion_tokens == 0
    vllm = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 1})
    assert vllm.choices[0].model_extra["prompt_logprobs"][0] is None


def test_streamed_echo_equals_the_whole_answer(server):
    body = {"model": MODEL, "prompt": TEXTS[2], "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 2}
    whole = post(server, body)["choices"][0]
    with httpx.stream("POST", server.base_url + "/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        chunks = [
            json.loads(line.removeprefix("data: "))
            for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    entries = [c["choices"][0] for c in chunks]
    assert "".join(e["text"] for e in entries) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for e in entries for v in e["logprobs"][key]] == whole["logprobs"][key]


def test_scoring_runs_beside_generation(server, tokenizer):
    """Scored prompts and ordinary requests at once: each answer as it is alone."""
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    scoring = {"max_tokens": 0, "logprobs": 1, "echo": True}
    generating = {"max_tokens": 8, "temperature": 0}

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            bodies = [{"model": MODEL, "prompt": p, **scoring} for p in ids]
            bodies += [{"model": MODEL, "prompt": text, **generating} for text in TEXTS]
            responses = await asyncio.gather(*(http.post("/completions", json=b) for b in bodies))
        return [r.json() for r in responses]

    together = asyncio.run(run())
    for prompt_ids, result in zip(ids, together[:3]):
        check_scores(server, prompt_ids, result["choices"][0]["logprobs"]["token_logprobs"], None, 1)
    for text, result in zip(TEXTS, together[3:]):
        assert result["choices"][0]["text"] == post(server, {"prompt": text, **generating})["choices"][0]["text"]
