"""response_format (json_object, json_schema) over real HTTP, through the openai client.

The tiny model is random: only the grammar's mask can make its output valid JSON, so valid JSON
that ends as a stop proves the mask is applied each step and the matcher advanced."""

from __future__ import annotations

import json
import threading

import openai
import pytest
import torch
from server_support import checkpoint_path, demo_checkpoint_path, start_server

from sliceserve.engine.loading import load_engine

pytest.importorskip("xgrammar")

MODEL = "tiny-sliced"
PROMPT = "mira tensul kalo ve"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = load_engine(checkpoint_path(tmp_path_factory), max_batch=8, max_model_len=512)
    with start_server(engine, model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def check_person(text: str) -> None:
    value = json.loads(text)
    try:
        import jsonschema
    except ImportError:
        assert set(value) == {"name", "age"}, value
        assert isinstance(value["name"], str) and len(value["name"]) <= 12
        assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    else:
        jsonschema.validate(value, SCHEMA)


def chat(client, **fields):
    messages = [{"role": "user", "content": PROMPT}]
    fields = {"max_tokens": 200, **fields}
    return client.chat.completions.create(model=MODEL, messages=messages, **fields).choices[0]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1, "seed": 7}], ids=["greedy", "seeded"])
def test_json_schema_on_chat(client, sampling):
    choice = chat(client, response_format=JSON_SCHEMA, **sampling)
    print(choice.message.content)
    assert choice.finish_reason == "stop", choice.message.content
    check_person(choice.message.content)


def test_json_schema_on_completions(client):
    choice = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=200, temperature=1, seed=3, extra_body={"response_format": JSON_SCHEMA}
    ).choices[0]
    assert choice.finish_reason == "stop", choice.text
    check_person(choice.text)


def test_several_choices_each_follow_the_grammar(client):
    messages = [{"role": "user", "content": PROMPT}]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=200, temperature=1, seed=11, n=3, response_format=JSON_SCHEMA
    )
    for choice in answer.choices:
        assert choice.finish_reason == "stop"
        check_person(choice.message.content)


def test_json_object_gives_an_object(client):
    schema = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 6}}, "required": ["k"]}
    # json_object allows any object; a random model may wander, so the schema case above bounds it
    choice = chat(client, response_format={"type": "json_object"}, temperature=0)
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut off at max_tokens: still a prefix the grammar allowed
        assert choice.message.content.startswith("{")
    bounded = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "k", "schema": schema}})
    assert bounded.finish_reason == "stop"
    assert isinstance(json.loads(bounded.message.content), dict)


def test_text_is_the_default(client):
    plain = chat(client, temperature=0, max_tokens=12)
    text = chat(client, temperature=0, max_tokens=12, response_format={"type": "text"})
    assert plain.message.content == text.message.content


@pytest.mark.parametrize("fields,param", [({"ignore_eos": True}, "ignore_eos"), ({"min_tokens": 2}, "min_tokens")])
@pytest.mark.parametrize("route", ["/chat/completions", "/completions"])
def test_a_grammar_refuses_what_would_hold_it_open(server, route, fields, param):
    """The answer ends with eos once the grammar is complete: ignore_eos, or min_tokens past where
    the grammar may end, would leave nothing the grammar allows."""
    import httpx

    body = {"max_tokens": 50, "response_format": JSON_SCHEMA, **fields}
    body |= {"messages": [{"role": "user", "content": PROMPT}]} if route.startswith("/chat") else {"prompt": PROMPT}
    response = httpx.post(server.base_url + route, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "response_format" in error["message"], error
    plain = {"max_tokens": 4, "response_format": {"type": "text"}, **fields}  # no grammar: nothing to refuse
    plain |= {"messages": [{"role": "user", "content": PROMPT}]} if route.startswith("/chat") else {"prompt": PROMPT}
    assert httpx.post(server.base_url + route, json=plain, timeout=60).status_code == 200


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}},
        {"type": "json_schema"},
        {"type": "structural_tag"},
    ],
    ids=["unknown-type", "schema-not-object", "no-json-schema", "structural-tag"],
)
def test_bad_response_format_is_a_400(client, response_format):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, response_format=response_format)
    assert "response_format" in str(raised.value)


def test_plain_requests_beside_structured_ones_are_unaffected(client):
    prompts = [f"{PROMPT} {word}" for word in ("sa", "lo", "ve", "mi")]

    def plain(prompt: str) -> str:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    alone = [plain(p) for p in prompts]
    results: dict[int, str] = {}
    structured = []

    def run_structured() -> None:
        structured.append(chat(client, response_format=JSON_SCHEMA, temperature=1, seed=5))

    def run_plain(i: int) -> None:
        results[i] = plain(prompts[i])

    threads = [threading.Thread(target=run_structured) for _ in range(3)]
    threads += [threading.Thread(target=run_plain, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[i] for i in range(len(prompts))] == alone
    assert len(structured) == 3 and all(c.finish_reason == "stop" for c in structured)


def test_masked_sampling_of_random_logits_follows_the_grammar(server):
    """A batch of 8 structured rows sampled from random logits (the least likely to follow a grammar
    by themselves) for 20 steps: every token is one a fresh matcher of the grammar accepts, while
    the same logits sampled without grammars are not. (Its cost per step is measured in
    benchmarks/grammar_overhead.py, not here.)"""
    import xgrammar

    from sliceserve.engine.requests import SamplingParams
    from sliceserve.engine.sampler import SamplingRows, sample
    from sliceserve.server.protocol import ResponseFormat
    from sliceserve.server.structured_output import compile_response_format, grammar_states

    engine = server.engine
    vocab = engine.model.spec.vocab_size
    compiled = compile_response_format(ResponseFormat.model_validate(JSON_SCHEMA), engine)
    params = [SamplingParams(temperature=0.0, grammar=g) for g in grammar_states(compiled, engine, 8)]
    outputs: list[list[int]] = [[] for _ in params]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(8, vocab, generator=generator)
        rows = SamplingRows.build(params, [len(o) for o in outputs], [0] * 8, "cpu", vocab, output_ids=outputs)
        for output, token in zip(outputs, sample(logits, rows).to_host()[0]):
            output.append(token)
    grammar = params[0].grammar.compiled
    for output in outputs:
        matcher = xgrammar.GrammarMatcher(grammar)
        assert all(matcher.accept_token(token) for token in output if not matcher.is_terminated())
    assert engine.tokenizer.decode(outputs[0]).lstrip().startswith("{")
    plain = [SamplingParams(temperature=0.0) for _ in params]
    unmasked = sample(logits, SamplingRows.build(plain, [0] * 8, [0] * 8, "cpu", vocab)).to_host()[0]
    matcher = xgrammar.GrammarMatcher(grammar)
    assert not all(matcher.accept_token(token) for token in unmasked[:1])  # a random first token is no '{'


def test_the_mask_kernel_matches_its_reference():
    from sliceserve.engine.grammar import masked_by_grammar, masked_by_grammar_reference

    generator = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word's spare bits are ignored
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, (vocab + 31) // 32), dtype=torch.int32, generator=generator)
    bitmask[1] = -1  # a row without a grammar: everything allowed
    scores = torch.randn(5, vocab, generator=generator)
    assert torch.equal(masked_by_grammar(scores, bitmask), masked_by_grammar_reference(scores, bitmask))
    assert torch.equal(masked_by_grammar(scores, bitmask)[1], scores[1])


def test_a_state_sent_to_an_engine_process_replays_the_output(server):
    """Pickled (as for the engine's own process), a state restarts empty and catches up from the output."""
    import pickle

    from sliceserve.engine.grammar import grammar_bitmask
    from sliceserve.server.protocol import ResponseFormat
    from sliceserve.server.structured_output import compile_response_format, grammar_states

    engine = server.engine
    vocab = engine.model.spec.vocab_size
    compiled = compile_response_format(ResponseFormat.model_validate(JSON_SCHEMA), engine)
    state = grammar_states(compiled, engine, 1)[0]
    output = engine.tokenizer('{"name": "ab', add_special_tokens=False)["input_ids"]
    here = grammar_bitmask([state], [output], vocab)
    there = grammar_bitmask([pickle.loads(pickle.dumps(state))], [output], vocab)
    assert torch.equal(here, there)
    assert not torch.equal(here, grammar_bitmask(grammar_states(compiled, engine, 1), [[]], vocab))


@pytest.mark.slow
def test_special_tokens_never_fill_a_string(tmp_path_factory):
    """Inside a JSON string any text goes, but a special token's text is not text: its id stays masked.
    SmolLM2's tokenizer is the case: xgrammar reads `<|im_start|>` in its vocabulary as plain characters
    and detects none of its 17 special tokens unless told."""
    import xgrammar

    from sliceserve.engine.grammar import GrammarState, allowed_from_bitmask, grammar_bitmask
    from sliceserve.model.loader import load_tokenizer
    from sliceserve.server.structured_output import tokenizer_info

    tokenizer = load_tokenizer(demo_checkpoint_path(tmp_path_factory))
    vocab, stops = 49152, (tokenizer.eos_token_id,)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} - set(stops)
    output = tokenizer('{"name": "ab', add_special_tokens=False)["input_ids"]
    plain = tokenizer("c", add_special_tokens=False)["input_ids"][0]

    def allowed_after_output(info):
        compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        bitmask = grammar_bitmask([GrammarState(compiled, stops)], [output], vocab)
        return allowed_from_bitmask(bitmask, vocab)[0]

    unmarked = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=list(stops))
    assert allowed_after_output(unmarked)[sorted(special)].any(), "xgrammar alone lets some into strings"
    allowed = allowed_after_output(tokenizer_info(tokenizer, vocab, stops))
    assert allowed[plain], "ordinary text may continue the string"
    assert not allowed[sorted(special)].any(), [i for i in special if allowed[i]]


COUNTRY = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "capital": {"type": "string", "maxLength": 40}},
    "required": ["name", "capital"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_the_demo_model_answers_a_json_schema(tmp_path_factory):
    """SmolLM2-135M-Instruct (the demo model, exported dense) fills a small schema (about 20 tokens
    and 2.5 s an answer on a 2-core CPU, 2026-12)."""
    import jsonschema

    engine = load_engine(demo_checkpoint_path(tmp_path_factory), max_batch=2, max_model_len=256)
    with start_server(engine, model_name="smollm2-dense") as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=120)
        response_format = {"type": "json_schema", "json_schema": {"name": "country", "schema": COUNTRY}}
        for sampling in ({"temperature": 0}, {"temperature": 1, "seed": 1}):
            choice = client.chat.completions.create(
                model="smollm2-dense",
                messages=[{"role": "user", "content": "Name a country and its capital, as JSON."}],
                response_format=response_format,
                max_tokens=48,
                **sampling,
            ).choices[0]
            print(sampling, choice.message.content)
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), COUNTRY)
        # its chat template never reads `tools`: tools are refused by name, not left out of the prompt
        with pytest.raises(openai.BadRequestError, match="no tool support"):
            client.chat.completions.create(
                model="smollm2-dense",
                messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
                max_tokens=4,
            )
