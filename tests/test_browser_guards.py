"""Without an API key, a web page in the user's browser must not reach the server: bodies must be
declared application/json (a page can send text/plain or forms without asking first), and the
Host header must be an address, localhost, the bound host or an allowed name (DNS rebinding
sends the attacker's own name). With a key, neither check applies. Real HTTP, a real server.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_support import checkpoint_path, start_server

from sliceserve.engine.loading import load_engine

BODY = json.dumps({"prompt": "kalo", "max_tokens": 2})


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory):
    return checkpoint_path(tmp_path_factory)


@pytest.fixture(scope="module")
def server(engine_path):
    with start_server(load_engine(engine_path, max_batch=2, max_model_len=128), model_name="tiny") as running:
        yield running


def post(server, headers: dict[str, str], route: str = "/v1/completions") -> httpx.Response:
    return httpx.post(server.url + route, content=BODY, headers=headers, timeout=30)


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_body_not_declared_json_is_a_415(server, content_type: str | None):
    response = post(server, {} if content_type is None else {"Content-Type": content_type})
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8"])
def test_json_bodies_are_served(server, content_type: str):
    assert post(server, {"Content-Type": content_type}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "localhost.evil.example", "tiny"])
def test_a_foreign_host_name_is_refused(server, host: str):
    response = post(server, {"Content-Type": "application/json", "Host": host})
    assert response.status_code == 400 and response.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(server.url + "/v1/models", headers={"Host": host}).status_code == 400


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8000", "LOCALHOST", "[::1]:8000", "10.1.2.3:80"])
def test_addresses_and_localhost_are_served(server, host: str):
    assert post(server, {"Content-Type": "application/json", "Host": host}).status_code == 200


def test_the_openai_client_passes(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    assert client.completions.create(model="tiny", prompt="kalo", max_tokens=2).choices[0].text is not None


def test_allowed_hosts_add_names_and_star_allows_any(engine_path):
    with start_server(
        load_engine(engine_path, max_batch=2, max_model_len=128), model_name="tiny", allowed_hosts=("box.lan",)
    ) as running:
        assert post(running, {"Content-Type": "application/json", "Host": "box.lan:8000"}).status_code == 200
        assert post(running, {"Content-Type": "application/json", "Host": "evil.example"}).status_code == 400
    with start_server(
        load_engine(engine_path, max_batch=2, max_model_len=128), model_name="tiny", allowed_hosts=("*",)
    ) as running:
        assert post(running, {"Content-Type": "application/json", "Host": "evil.example"}).status_code == 200
        assert post(running, {"Content-Type": "text/plain"}).status_code == 415  # still JSON only


def test_with_an_api_key_neither_check_applies(engine_path):
    with start_server(
        load_engine(engine_path, max_batch=2, max_model_len=128), model_name="tiny", api_key="k"
    ) as running:
        auth = {"Authorization": "Bearer k"}
        assert post(running, {**auth, "Content-Type": "text/plain", "Host": "evil.example"}).status_code == 200
        assert post(running, {"Content-Type": "text/plain", "Host": "evil.example"}).status_code == 401
