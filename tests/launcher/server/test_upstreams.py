"""Upstream providers through a real server with no local model: listings translated from each provider's
documented shape, and every way an upstream can fail answered in OpenAI's shape while the rest keeps serving."""
from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.launcher.server.conftest import start_server
from tests.launcher.server.fake_upstreams import SLOW_S, FakeProviders

pytestmark = pytest.mark.timeout(300)


def _refused_url() -> str:
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.fixture(scope="module")
def fake():
    providers = FakeProviders()
    yield providers
    providers.close()


@pytest.fixture(scope="module")
def gateway(fake, tmp_path_factory):
    srv = start_server(f"""
[model]
enabled = false

[[upstreams]]
name = "fake"
engine = "custom"
base_url = "{fake.url}/openai/v1"
api_key_env = "FAKE_KEY"
timeout_s = {SLOW_S / 2}

[[upstreams]]
name = "claude"
engine = "anthropic"
base_url = "{fake.url}/anthropic"

[[upstreams]]
name = "az"
engine = "azure"
base_url = "{fake.url}/azure"
api_version = "2024-10-21"

[[upstreams]]
name = "co"
engine = "cohere"
base_url = "{fake.url}/cohere"

[[upstreams]]
name = "down"
engine = "vllm"
base_url = "{_refused_url()}"

[[upstreams]]
name = "garbled"
engine = "vllm"
base_url = "{fake.url}/broken/v1"
""", tmp_path_factory.mktemp("gateway"), api_key=None,
        env={"FAKE_KEY": "fk-1", "ANTHROPIC_API_KEY": "ak-1", "AZURE_OPENAI_API_KEY": "zk-1", "COHERE_API_KEY": "ck-1"})
    try:
        yield srv
    finally:
        srv.stop()


def chat(srv, model: str, stream: bool = False, **kw) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", timeout=60, headers=kw.pop("headers", {}),
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **kw})


def test_listings_are_translated_and_the_unreachable_left_out(gateway, fake):
    data = httpx.get(gateway.url + "/v1/models", timeout=60).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert {m for m in by_id} == {"ok", "fail500", "badjson", "cut", "slow", "denied", "claude-sonnet-4-20250514",
                                  "claude-3-5-haiku-20241022", "gpt-4o", "text-embedding-3-small",
                                  "command-r-08-2024", "embed-english-v3.0"}
    assert {m["provider"] for m in data} == {"fake", "claude", "az", "co"}   # 'down' and 'garbled' left out
    assert all(m["owned_by"] == m["provider"] and m["object"] == "model" for m in data)
    # Anthropic: both pages (after_id), its headers
    first, second = [r for r in fake.requests if r["path"] == "/anthropic/v1/models"][:2]
    assert first["headers"]["x-api-key"] == "ak-1" and first["headers"]["anthropic-version"] == "2023-06-01"
    assert second["query"]["after_id"] == ["claude-sonnet-4-20250514"]
    assert by_id["claude-sonnet-4-20250514"]["created"] == 1747872000
    # Azure: api-version and api-key; capabilities from its flags
    azure = fake.last("/azure/openai/models")
    assert azure["query"]["api-version"] == ["2024-10-21"] and azure["headers"]["api-key"] == "zk-1"
    assert by_id["gpt-4o"]["capabilities"] == ["chat"] and by_id["text-embedding-3-small"]["capabilities"] == ["embedding"]
    # Cohere: both pages (page_token), Bearer; endpoints -> capabilities; context_length -> context_window
    cohere = [r for r in fake.requests if r["path"] == "/cohere/v1/models"]
    assert cohere[0]["headers"]["authorization"] == "Bearer ck-1" and cohere[1]["query"]["page_token"] == ["p2"]
    assert by_id["command-r-08-2024"]["capabilities"] == ["completion", "chat"]
    assert by_id["embed-english-v3.0"]["context_window"] == 512
    # the catalogue's facts join what the upstreams say (prices per 1M tokens)
    catalog = {m["id"]: m for m in httpx.get(gateway.url + "/api/models", timeout=60).json()["models"]}
    assert catalog["gpt-4o"]["pricing"] == {"input": 2.5, "output": 10.0}
    assert catalog["gpt-4o"]["context_window"] == 128000 and "tools" in catalog["gpt-4o"]["features"]
    assert catalog["claude-3-5-haiku-20241022"]["pricing"] == {"input": 0.8, "output": 4.0}
    assert catalog["ok"]["pricing"] == {"input": 0.0, "output": 0.0}          # self-hosted: free
    embeddings = httpx.get(gateway.url + "/api/models?capability=embedding", timeout=60).json()["models"]
    assert {m["id"] for m in embeddings} == {"text-embedding-3-small", "embed-english-v3.0"}


def test_a_provider_asked_for_by_name(gateway):
    only = httpx.get(gateway.url + "/v1/models", params={"provider": "co"}, timeout=60).json()["data"]
    assert [m["id"] for m in only] == ["command-r-08-2024", "embed-english-v3.0"]
    for name in ("down", "garbled"):
        r = httpx.get(gateway.url + "/v1/models", params={"provider": name}, timeout=60)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    assert httpx.get(gateway.url + "/v1/models/gpt-4o", timeout=60).json()["provider"] == "az"
    missing = httpx.get(gateway.url + "/v1/models/nope", timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_requests_are_proxied_with_only_the_model_rewritten(gateway, fake):
    r = chat(gateway, "ok", temperature=0.5, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello"
    seen = fake.last("/openai/v1/chat/completions")
    assert seen["body"] == {"model": "ok", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                            "temperature": 0.5}
    assert seen["headers"]["x-request-id"] == "trace-42"
    assert seen["headers"]["authorization"] == "Bearer fk-1"       # no caller header: the upstream's own key
    chat(gateway, "ok", headers={"Authorization": "Bearer caller-key"})
    assert fake.last("/openai/v1/chat/completions")["headers"]["authorization"] == "Bearer caller-key"
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=60,
                      json={"model": "ok", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]] == ["hel", "lo"]
    assert events[-1] == "data: [DONE]"
    # embeddings and completions go to the same paths under the base URL; /tokenize beside it (vLLM's place)
    for path, body in (("/v1/embeddings", {"model": "ok", "input": "x"}), ("/v1/completions", {"model": "ok",
                       "prompt": "x"}), ("/tokenize", {"model": "ok", "prompt": "x"})):
        assert httpx.post(gateway.url + path, json=body, timeout=60).status_code == 200
        assert fake.requests[-1]["path"] == {"/tokenize": "/openai/tokenize"}.get(path, "/openai" + path)
        assert fake.requests[-1]["body"] == body


def test_anthropic_and_cohere_models_are_listed_not_proxied(gateway):
    r = chat(gateway, "claude-3-5-haiku-20241022")
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
    assert "not OpenAI-compatible" in r.json()["error"]["message"]


@pytest.mark.parametrize("model, status, code", [
    ("fail500", 502, "upstream_error"),
    ("badjson", 502, "upstream_bad_response"),
    ("slow", 504, "upstream_timeout"),
    ("denied", 401, "invalid_api_key"),          # an upstream 4xx is passed through as it came
])
def test_a_failing_upstream_is_a_clear_error(gateway, model, status, code):
    r = chat(gateway, model)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and set(error) >= {"message", "type", "param", "code"}
    assert httpx.get(gateway.url + "/health", timeout=30).status_code == 200
    assert chat(gateway, "ok").status_code == 200   # and everything else is still served


def test_a_stream_cut_midway_ends_with_an_error_event_then_done(gateway):
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=60,
                      json={"model": "cut", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "hel"
    assert json.loads(events[-2])["error"]["code"] == "upstream_stream_error" and events[-1] == "[DONE]"
    assert chat(gateway, "ok", stream=False).status_code == 200


def test_a_refused_connection_is_a_502(tmp_path):
    srv = start_server(f"""
[model]
enabled = false

[[upstreams]]
name = "gone"
engine = "vllm"
base_url = "{_refused_url()}"
models = ["m"]
""", tmp_path, api_key=None)
    try:
        r = chat(srv, "m")
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
        assert [m["id"] for m in httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]] == ["m"]
    finally:
        srv.stop()


def test_llm_list_shows_a_servers_catalogue(gateway):
    from click.testing import CliRunner

    from launcher.cli import main
    result = CliRunner().invoke(main, ["list", "--json", "--provider", "server", "--url", gateway.url])
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in json.loads(result.output)["server"]["models"]}
    assert rows["gpt-4o"]["provider"] == "az" and rows["gpt-4o"]["pricing"]["input"] == 2.5
    table = CliRunner().invoke(main, ["list", "--provider", "server", "--url", gateway.url]).output
    assert f"Served by {gateway.url}" in table and "STATUS" in table and "available" in table
