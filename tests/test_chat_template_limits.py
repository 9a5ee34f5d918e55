"""Chat templates render under a time and a size limit: a template that loops for ever, writes a
huge prompt, asks for a range the sandbox refuses or reaches outside the sandbox gets a 400 (not a
hang, not a 500), and the server serves others meanwhile; `generate --chat` ends in one line.

One checkpoint copy whose template misbehaves according to the user's message, so that each
case goes through a real server over HTTP.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from cli_support import assert_one_line_error, run_sliceserve
from server_support import CHAT_TEMPLATE, checkpoint_path, start_server

from sliceserve.cli import main
from sliceserve.engine.loading import load_engine
from sliceserve.server.chat_template import TEMPLATE_SECONDS, ChatTemplateError, render_chat

MISCHIEF = (
    "{% set said = messages[-1]['content'] %}"
    "{% if said == 'loop' %}{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    "{% elif said == 'huge' %}{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}"
    "{% elif said == 'range' %}{% for i in range(10**9) %}{% endfor %}"
    "{% elif said == 'escape' %}{{ ''.__class__.__mro__[1].__subclasses__() }}"
    "{% endif %}" + CHAT_TEMPLATE
)

CASES = {
    # message: words of the 400's message
    "loop": ["ran longer than", f"{TEMPLATE_SECONDS:g} s"],
    "huge": ["rendered more than", "characters"],
    "range": ["failed", "OverflowError"],
    "escape": ["refused", "unsafe"],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "mischief"
    if not folder.exists():
        shutil.copytree(checkpoint_path(tmp_path_factory), folder)
        (folder / "chat_template.jinja").write_text(MISCHIEF)
    return folder


@pytest.fixture(scope="module")
def server(folder: Path):
    with start_server(load_engine(folder, max_batch=2, max_model_len=128), model_name="tiny") as running:
        yield running


def chat(server, content: str, timeout: float = 30) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    return httpx.post(server.base_url + "/chat/completions", json=body, timeout=timeout)


@pytest.mark.parametrize("said", CASES)
def test_a_misbehaving_template_is_a_400(server, said: str):
    started = time.monotonic()
    response = chat(server, said)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages"
    for word in CASES[said]:
        assert word.lower() in error["message"].lower(), error["message"]
    assert time.monotonic() - started < TEMPLATE_SECONDS + 5


def test_others_are_served_while_a_template_loops(server):
    looping: dict = {}
    thread = threading.Thread(target=lambda: looping.update(response=chat(server, "loop")))
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert chat(server, "hello").status_code == 200
    assert time.monotonic() - started < TEMPLATE_SECONDS
    thread.join(timeout=30)
    assert looping["response"].status_code == 400
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'status="500"' not in metrics


def test_the_limits_leave_a_normal_template_alone(server):
    tokenizer = server.engine.tokenizer
    conversation = [{"role": "user", "content": "kalo mira"}]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert render_chat(tokenizer, conversation) == list(expected)
    with pytest.raises(ChatTemplateError, match="more than 10 characters"):
        render_chat(tokenizer, conversation, max_chars=10)


def test_generate_chat_with_a_refused_template_prints_one_line(folder: Path, tmp_path: Path):
    result = run_sliceserve("generate", folder, "escape", "--chat", "--max-tokens", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "--chat", "refused")


def test_generate_chat_with_a_looping_template_stops(folder: Path, capsys):
    capsys.readouterr()
    assert main(["generate", str(folder), "loop", "--chat", "--max-tokens", "2"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sliceserve: error: --chat: the chat template ran longer"), lines
