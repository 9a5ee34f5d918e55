"""OpenAI's and vLLM's sampling fields over real HTTP: each one's effect on what is generated.

Greedy answers are compared with the reference model's plain forward, the field applied to its
logits by hand; token ids come back through logprobs with return_tokens_as_token_ids."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch
from server_support import checkpoint_path, start_server

from sliceserve.engine.loading import load_engine

MODEL = "tiny-sliced"
PROMPT = "mira tensul kalo ve"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = load_engine(checkpoint_path(tmp_path_factory), max_batch=4, max_model_len=256)
    with start_server(engine, model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def tokenizer(server):
    return server.engine.tokenizer


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def complete(server, **fields) -> dict:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **fields}
    response = httpx.post(server.base_url + "/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def generated(server, **fields) -> list[int]:
    """The token ids a completion generates (eos included when it ends the answer)."""
    choice = complete(server, logprobs=0, return_tokens_as_token_ids=True, **fields)
    return [int(token.removeprefix("token_id:")) for token in choice["logprobs"]["tokens"]]


def reference_greedy(server, prompt_ids: list[int], steps: int, adjust=None) -> list[int]:
    """Greedy tokens from the plain forward, `adjust(logits, output, prompt)` applied first."""
    ids, out = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(steps):
            logits = server.engine.model(torch.tensor([ids]))[0, -1].float()
            if adjust is not None:
                logits = adjust(logits, out, prompt_ids)
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def counts(ids: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=vocab).float()


@pytest.fixture(scope="module")
def baseline(server) -> list[int]:
    return generated(server)


def test_the_baseline_is_the_reference_greedy_answer(server, tokenizer, baseline):
    assert baseline == reference_greedy(server, tokenizer(PROMPT)["input_ids"], 12)


LONG = 40  # long enough that the greedy answer repeats tokens, which the penalties then change


@pytest.fixture(scope="module")
def long_baseline(server) -> list[int]:
    output = generated(server, max_tokens=LONG)
    assert len(set(output)) < len(output)
    return output


@pytest.mark.parametrize("penalty", [1.5, -0.5])
def test_frequency_penalty(server, tokenizer, long_baseline, penalty):
    vocab = server.engine.model.spec.vocab_size

    def adjust(logits, out, prompt):
        return logits - penalty * counts(out, vocab) if out else logits

    penalised = generated(server, frequency_penalty=penalty, max_tokens=LONG)
    assert penalised == reference_greedy(server, tokenizer(PROMPT)["input_ids"], LONG, adjust)
    assert penalised != long_baseline


def test_presence_penalty(server, tokenizer, long_baseline):
    vocab = server.engine.model.spec.vocab_size

    def adjust(logits, out, prompt):
        return logits - 2.0 * (counts(out, vocab) > 0).float() if out else logits

    penalised = generated(server, presence_penalty=2.0, max_tokens=LONG)
    assert penalised == reference_greedy(server, tokenizer(PROMPT)["input_ids"], LONG, adjust)
    assert penalised != long_baseline


def test_repetition_penalty(server, tokenizer, baseline):
    vocab = server.engine.model.spec.vocab_size

    def adjust(logits, out, prompt):
        seen = counts([*prompt, *out], vocab) > 0
        return torch.where(seen, torch.where(logits > 0, logits / 1.8, logits * 1.8), logits)

    penalised = generated(server, repetition_penalty=1.8)
    assert penalised == reference_greedy(server, tokenizer(PROMPT)["input_ids"], 12, adjust)
    assert penalised != baseline


def test_logit_bias_through_the_openai_client(client, tokenizer, baseline):
    favourite = tokenizer(" kalo", add_special_tokens=False)["input_ids"][0]
    pushed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={str(favourite): 100}
    )
    assert pushed.choices[0].text == tokenizer.decode([favourite] * 5)
    banned = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(baseline[0]): -100}, logprobs=0
    )
    assert banned.choices[0].text != tokenizer.decode([baseline[0]])
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=3,
        temperature=0,
        logit_bias={str(favourite): 100},
    )
    assert chat.choices[0].message.content == tokenizer.decode([favourite] * 3)


def test_min_p_drops_unlikely_tokens(server):
    """Sampled at temperature 1.5: every token within min_p of the most likely one (after the
    temperature, as vLLM applies it); the same seed without min_p takes some that are not."""
    temperature, min_p = 1.5, 0.3
    floor = temperature * math.log(min_p) - 1e-5

    def gaps(**fields) -> list[float]:
        choice = complete(
            server, max_tokens=40, temperature=temperature, seed=11, logprobs=1, ignore_eos=True, **fields
        )
        logprobs = choice["logprobs"]
        return [chosen - max(top.values()) for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"])]

    assert all(gap >= floor for gap in gaps(min_p=min_p))
    assert any(gap < floor for gap in gaps())


def test_min_tokens_holds_eos_back(server, tokenizer):
    eos = str(tokenizer.eos_token_id)
    early = complete(server, logit_bias={eos: 100})
    assert early["finish_reason"] == "stop" and early["text"] == ""
    held = generated(server, logit_bias={eos: 100}, min_tokens=4)
    assert len(held) == 5 and held[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in held[:4]


def test_stop_token_ids_end_the_answer(server, tokenizer, baseline):
    stop = baseline[3]
    k = baseline.index(stop)
    choice = complete(server, stop_token_ids=[stop])
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == tokenizer.decode(baseline[:k])
    assert generated(server, stop_token_ids=[stop]) == baseline[: k + 1]
    kept = complete(server, stop_token_ids=[stop], include_stop_str_in_output=True)
    assert kept["text"] == tokenizer.decode(baseline[: k + 1]) and kept["finish_reason"] == "stop"


def test_include_stop_str_in_output(server):
    full = complete(server, max_tokens=16)["text"]
    stop = full[6:9]
    cut = full.find(stop)
    assert complete(server, max_tokens=16, stop=stop)["text"] == full[:cut]
    assert complete(server, max_tokens=16, stop=stop, include_stop_str_in_output=True)["text"] == full[: cut + 3]
    streamed = httpx.post(
        server.base_url + "/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": stop, "stream": True}
        | {"include_stop_str_in_output": True},
        timeout=60,
    )
    assert stop in streamed.text


def test_skip_special_tokens(server, tokenizer):
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    forced = {"logit_bias": {str(start): 100}, "max_tokens": 3}
    assert complete(server, **forced)["text"] == ""
    assert complete(server, skip_special_tokens=False, **forced)["text"] == "<|im_start|>" * 3


def test_bad_words_are_never_completed(server, tokenizer, baseline):
    word = tokenizer.decode([baseline[0]]).strip()
    banned = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (word, " " + word)]
    output = generated(server, bad_words=[word])
    assert output != baseline
    for ids in banned:
        assert not any(output[i : i + len(ids)] == ids for i in range(len(output)))


def test_allowed_token_ids(server, tokenizer, client):
    allowed = tokenizer(" kalo mira ten", add_special_tokens=False)["input_ids"]
    output = generated(server, allowed_token_ids=allowed, temperature=1.0, seed=5, max_tokens=20)
    assert set(output) <= set(allowed) and len(set(output)) > 1
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=6,
        temperature=1.0,
        seed=5,
        extra_body={"allowed_token_ids": allowed[:1]},
    )
    assert chat.choices[0].message.content == tokenizer.decode(allowed[:1] * 6)


def test_vllm_fields_through_the_chat_route(server, client, tokenizer):
    messages = [{"role": "user", "content": PROMPT}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    vocab = server.engine.model.spec.vocab_size

    def adjust(logits, out, prompt):
        return logits - 1.5 * counts(out, vocab) if out else logits

    expected = reference_greedy(server, prompt_ids, 8, adjust)
    result = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, frequency_penalty=1.5
    )
    assert result.choices[0].message.content == tokenizer.decode(expected)
    stopped = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"stop_token_ids": [expected[2]]}
    )
    k = expected.index(expected[2])
    assert stopped.choices[0].message.content == tokenizer.decode(expected[:k])
    assert stopped.choices[0].finish_reason == "stop"


def test_truncate_prompt_tokens_keeps_the_end(server, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    result = httpx.post(
        server.base_url + "/completions",
        json={"model": MODEL, "prompt": ids, "max_tokens": 4, "temperature": 0, "truncate_prompt_tokens": 3},
        timeout=60,
    ).json()
    assert result["usage"]["prompt_tokens"] == 3
    assert result["choices"][0]["text"] == tokenizer.decode(reference_greedy(server, ids[-3:], 4))


def test_request_id_names_the_response(server):
    response = httpx.post(
        server.base_url + "/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "request_id": "my-request-7"},
        timeout=60,
    )
    assert response.json()["id"] == "cmpl-my-request-7"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"100000": 1}}, "logit_bias"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"min_tokens": 20, "max_tokens": 4}, "min_tokens"),
        ({"bad_words": [""]}, "bad_words"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
def test_bad_values_are_refused_naming_the_field(server, fields, param):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}
    response = httpx.post(server.base_url + "/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == param
