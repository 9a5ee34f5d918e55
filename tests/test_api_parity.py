"""Every request field of OpenAI's completion and chat schemas (read from the installed `openai`
client) and of vLLM's documented extras, sent to a real server: each is honoured (200) or
refused with a 400 that names it. Nothing is accepted and ignored: the schemas are an allow-list.

The outcomes are docs/api_parity.md. SLICESERVE_WRITE_API_PARITY=1 rewrites it; otherwise the
test fails when it is out of date.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

import httpx
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from server_support import start_server
from tool_support import tool_checkpoint

from sliceserve.engine.loading import load_engine
from sliceserve.server.protocol import ChatCompletionRequest, CompletionRequest

MODEL = "tiny-sliced"
PARITY_FILE = Path(__file__).resolve().parents[1] / "docs" / "api_parity.md"

# vLLM's extra fields (vllm/entrypoints/openai/protocol.py, the *-sampling-params and
# *-extra-params sections, plus fields of later releases).
VLLM_SAMPLING = [
    "use_beam_search",
    "top_k",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "allowed_token_ids",
    "prompt_logprobs",
    "bad_words",
]
VLLM_EXTRA = [
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "structured_outputs",
    "priority",
    "request_id",
    "logits_processors",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "cache_salt",
    "kv_transfer_params",
    "vllm_xargs",
]
VLLM_COMPLETION = [*VLLM_SAMPLING, *VLLM_EXTRA, "add_special_tokens", "prompt_embeds"]
VLLM_CHAT = [
    *VLLM_SAMPLING,
    *VLLM_EXTRA,
    "best_of",
    "echo",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "documents",
    "chat_template",
    "chat_template_kwargs",
    "mm_processor_kwargs",
    "structural_tag",
    "include_reasoning",
]

# What each field is sent with: a value that asks for something (not the field's neutral
# default), and other fields it needs beside it.
EXAMPLES: dict[str, object] = {
    "best_of": 2,
    "echo": True,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "logit_bias": {"5": 2.0},
    "logprobs": 2,
    "max_tokens": 3,
    "max_completion_tokens": 3,
    "model": MODEL,
    "n": 2,
    "seed": 7,
    "stop": ["zz"],
    "stream": True,
    "stream_options": ({"include_usage": True}, {"stream": True}),
    "suffix": " and so on",
    "temperature": 0.5,
    "top_p": 0.9,
    "user": "someone",
    "audio": {"voice": "alloy", "format": "wav"},
    "function_call": {"name": "f"},
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "metadata": {"team": "a"},
    "modalities": ["text", "audio"],
    "moderation": {"model": "omni-moderation-latest"},
    "parallel_tool_calls": False,
    "prediction": {"type": "content", "content": "kalo"},
    "prompt_cache_key": "key-1",
    "prompt_cache_options": {"mode": "implicit", "ttl": "30m"},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "low",
    "response_format": {"type": "json_object"},
    "safety_identifier": "user-hash",
    "service_tier": "flex",
    "store": True,
    "tool_choice": ("required", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "top_logprobs": (2, {"logprobs": True}),
    "verbosity": "low",
    "web_search_options": {"search_context_size": "low"},
    "use_beam_search": True,
    "top_k": 5,
    "min_p": 0.1,
    "repetition_penalty": 1.2,
    "length_penalty": 0.8,
    "stop_token_ids": [5],
    "include_stop_str_in_output": True,
    "ignore_eos": True,
    "min_tokens": 2,
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
    "truncate_prompt_tokens": 2,
    "allowed_token_ids": [5, 6, 7],
    "prompt_logprobs": 1,
    "bad_words": ["kalo"],
    "guided_json": {"type": "object"},
    "guided_regex": "[a-z]+",
    "guided_choice": ["yes", "no"],
    "guided_grammar": 'root ::= "a"',
    "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " ",
    "structured_outputs": {"choice": ["yes", "no"]},
    "structural_tag": '{"type": "structural_tag"}',
    "priority": 1,
    "request_id": "request-1",
    "logits_processors": ["my.Processor"],
    "return_tokens_as_token_ids": (True, {"logprobs": 1}),
    "return_token_ids": True,
    "cache_salt": "salt-1",
    "kv_transfer_params": {"do_remote_decode": True},
    "vllm_xargs": {"x": 1},
    "prompt_embeds": "AAAA",
    "add_generation_prompt": False,
    "continue_final_message": True,
    "documents": [{"title": "t", "text": "kalo"}],
    "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": False},
    "mm_processor_kwargs": {"size": 1},
    "include_reasoning": False,
}
CHAT_EXAMPLES = {  # where chat sends another value
    "echo": True,
    "add_special_tokens": True,
    "logprobs": True,
    "return_tokens_as_token_ids": (True, {"logprobs": True}),
}
COMPLETION_EXAMPLES = {"add_special_tokens": False}


def openai_fields(module) -> list[str]:
    streaming = module.CompletionCreateParamsStreaming
    return sorted(set(typing.get_type_hints(module.CompletionCreateParamsBase)) | set(streaming.__annotations__))


ROUTES = {  # base body, OpenAI's fields, vLLM's, example overrides, the schema
    "/completions": (
        {"model": MODEL, "prompt": "kalo mira", "max_tokens": 2},
        openai_fields(completion_create_params),
        VLLM_COMPLETION,
        COMPLETION_EXAMPLES,
        CompletionRequest,
    ),
    "/chat/completions": (
        {"model": MODEL, "messages": [{"role": "user", "content": "kalo mira"}], "max_tokens": 2},
        openai_fields(chat_create_params),
        VLLM_CHAT,
        CHAT_EXAMPLES,
        ChatCompletionRequest,
    ),
}
BASE_FIELDS = {"prompt", "messages"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny model with a chat template that takes tools (Hermes-style: tests/tool_support.py),
    so that `tools` and `tool_choice` can be honoured; the tools it lists make prompts long."""
    engine = load_engine(tool_checkpoint(tmp_path_factory), max_batch=4, max_model_len=1024)
    with start_server(engine, model_name=MODEL) as running:
        yield running


def example(field: str, overrides: dict) -> tuple[object, dict]:
    value = overrides.get(field, EXAMPLES.get(field))
    assert value is not None, f"no example value for {field}: add one to EXAMPLES"
    return value if isinstance(value, tuple) else (value, {})


def outcome(server, route: str, base: dict, field: str, overrides: dict) -> tuple[str, str]:
    value, beside = example(field, overrides)
    response = httpx.post(server.base_url + route, json={**base, **beside, field: value}, timeout=60)
    if response.status_code == 200:
        return "honoured", ""
    error = response.json()["error"]
    assert response.status_code == 400, (field, response.status_code, error)
    assert error["param"] is not None and error["param"].split(".")[0] == field, (field, error)
    return "refused", error["message"]


def parity_table(server) -> str:
    lines = [
        "# API parity: request fields, honoured or refused",
        "",
        "Written by `tests/test_api_parity.py` (`SLICESERVE_WRITE_API_PARITY=1` rewrites it), which sends",
        "each field of OpenAI's request schemas (from the installed `openai` client) and vLLM's documented",
        "extra fields, one at a time, to a real server, each at a value that asks for something.",
        "*honoured*: answered 200 and acted on. *honoured, inert*: answered 200; nothing this server does",
        "depends on it (`user`, a cache key for a cache it does not have). *refused*: answered 400 naming",
        "the field. A refused field is accepted when null, and where the message says so, at the value",
        "that asks for nothing; any field not in these tables is refused as unknown.",
        "",
    ]
    for route, (base, openai_names, vllm_names, overrides, schema) in ROUTES.items():
        lines += [f"## POST /v1{route}", "", "| field | from | sent | result |", "| --- | --- | --- | --- |"]
        sources = {name: "OpenAI" for name in openai_names}
        for name in vllm_names:
            sources[name] = "OpenAI, vLLM" if sources.get(name) == "OpenAI" else "vLLM"
        for name in sorted(sources):
            if name in BASE_FIELDS:
                lines.append(f"| `{name}` | {sources[name]} | (every request) | honoured |")
                continue
            result, message = outcome(server, route, base, name, overrides)
            result += ", inert" if result == "honoured" and name in schema.INERT else ""
            value, _ = example(name, overrides)
            shown = f"`{value!r}`".replace("|", "\\|")
            lines.append(f"| `{name}` | {sources[name]} | {shown} | {result}{': ' + message if message else ''} |")
        lines.append("")
    return "\n".join(lines)


MUST_HONOUR = {
    "echo",
    "logprobs",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
    "min_p",
    "min_tokens",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "bad_words",
    "allowed_token_ids",
    "prompt_logprobs",
    "top_k",
    "seed",
    "n",
    "stop",
    "stream",
}


MUST_HONOUR_IN_CHAT = {"tools", "tool_choice", "parallel_tool_calls", "response_format"}


def test_every_field_is_honoured_or_refused_by_name(server):
    table = parity_table(server)
    completions, chat = table.split("## POST /v1/chat/completions")
    for section, names in ((completions, MUST_HONOUR), (chat, MUST_HONOUR_IN_CHAT)):
        for name in names:
            row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
            assert row.endswith("| honoured |"), row
    if os.environ.get("SLICESERVE_WRITE_API_PARITY"):
        PARITY_FILE.parent.mkdir(exist_ok=True)
        PARITY_FILE.write_text(table)
    assert PARITY_FILE.exists() and PARITY_FILE.read_text() == table, (
        f"{PARITY_FILE} is out of date: rerun with SLICESERVE_WRITE_API_PARITY=1"
    )


def test_unknown_fields_are_refused_by_name(server):
    for route, (base, *_) in ROUTES.items():
        response = httpx.post(server.base_url + route, json={**base, "frobnicate": 1}, timeout=60)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "frobnicate" and "frobnicate" in error["message"]
    nested = {**ROUTES["/chat/completions"][0], "messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}
    response = httpx.post(server.base_url + "/chat/completions", json=nested, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages")
    # a refused field sent as null is as if absent, as are neutral values
    for fields in ({"guided_json": None}, {"use_beam_search": False}, {"tool_choice": "none", "tools": []}):
        response = httpx.post(server.base_url + "/chat/completions", json={**ROUTES["/chat/completions"][0], **fields})
        assert response.status_code == 200, (fields, response.text)
