"""Server endpoints other than generation: readiness, models, tokenizer endpoints, metrics, auth, ids, CORS."""
from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.launcher.server.conftest import ALIAS, ALLOWED_ORIGIN, MAX_MODEL_LEN, PRIMARY


def test_readiness_went_from_503_with_phases_to_200(server):
    statuses = [s for s, _ in server.ready_phases]
    assert statuses[-1] == 200 and server.ready_phases[-1][1] == "ready"
    early = [phase for status, phase in server.ready_phases if status == 503]
    # The port answers before the model is loaded, naming the phase instead of refusing connections.
    assert early, server.ready_phases
    assert any(p in ("starting engine process", "loading weights", "allocating KV cache", "loading tokenizer")
               for p in early)
    assert set(statuses) == {503, 200} and statuses.index(200) == len(statuses) - 1


def test_supervisor_prints_one_ready_line(server):
    ready = [line for line in server.stdout_lines if "serving" in line]
    assert len(ready) == 1, server.stdout_lines
    line = ready[0]
    assert server.base_url in line and PRIMARY in line and ALIAS in line
    assert "device cpu" in line and re.search(r"KV cache \d+ tokens", line) and re.search(r"ready in [\d.]+s", line)


def test_health_and_ready_need_no_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    ready = httpx.get(server.url + "/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["max_model_len"] == MAX_MODEL_LEN and body["kv_capacity_tokens"] >= MAX_MODEL_LEN
    assert body["models"] == [PRIMARY, ALIAS]


def test_models_list_every_alias_with_real_root(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [PRIMARY, ALIAS]
    for m in models:
        assert m.owned_by == "llm" and m.object == "model"
        extra = m.model_dump()
        assert extra["root"] == server.model_path      # the real checkpoint, never a fake id
        assert extra["max_model_len"] == MAX_MODEL_LEN
        assert abs(m.created - models[0].created) == 0 and m.created > 1_600_000_000


def test_retrieve_model_with_slash_and_unknown(client):
    assert client.models.retrieve(PRIMARY).id == PRIMARY
    assert client.models.retrieve(ALIAS).id == ALIAS
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("org/does-not-exist")
    assert err.value.body["code"] == "model_not_found"


def test_alias_serves_the_same_model(client):
    kwargs = dict(prompt="The capital of France is", max_tokens=6, temperature=0)
    a = client.completions.create(model=PRIMARY, **kwargs)
    b = client.completions.create(model=ALIAS, **kwargs)
    assert a.choices[0].text == b.choices[0].text and b.model == ALIAS


def test_tokenize_detokenize_match_hf(server, hf_tokenizer):
    text = "Hello world, 12345 tokens ü 🚀!"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    want = hf_tokenizer(text)["input_ids"]
    assert body["tokens"] == want and body["count"] == len(want) and body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] == hf_tokenizer.convert_ids_to_tokens(want)
    r = httpx.post(server.url + "/detokenize", json={"tokens": want, "model": PRIMARY})
    assert r.json() == {"prompt": hf_tokenizer.decode(want)}


def test_tokenize_messages_matches_hf_chat_template(server, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    want = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert r.json()["tokens"] == list(want)


def test_version_docs_openapi(server):
    assert httpx.get(server.url + "/version").json()["version"]
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models/{model}", "/tokenize"} <= set(spec["paths"])
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # Offline: no script or stylesheet from anywhere but this server.
    assert not re.search(r"""(src|href)=["']https?://""", page.text)


def test_auth_on_v1_only(server):
    r = httpx.get(server.base_url + "/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.base_url + "/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0).models.list()
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.base_url + "/models", headers=server.auth).status_code == 200


def test_request_id_echoed_or_generated(server, client):
    r = httpx.get(server.base_url + "/models", headers={**server.auth, "X-Request-Id": "my-request-123"})
    assert r.headers["x-request-id"] == "my-request-123"
    r = httpx.get(server.base_url + "/models", headers=server.auth)
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    raw = client.chat.completions.with_raw_response.create(
        model=PRIMARY, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_headers={"x-request-id": "chat-req-7"})
    assert raw.headers["x-request-id"] == "chat-req-7"
    r = httpx.get(server.url + "/no/such/route", headers={"X-Request-Id": "err-1"})  # errors carry it too
    assert r.status_code == 404 and r.headers["x-request-id"] == "err-1"


def test_cors(server):
    r = httpx.get(server.base_url + "/models", headers={**server.auth, "Origin": ALLOWED_ORIGIN})
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    r = httpx.get(server.base_url + "/models", headers={**server.auth, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = httpx.options(server.base_url + "/chat/completions",
                        headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                                 "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204  # a preflight carries no key and must not be refused
    assert pre.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()


def test_decoder_model_embeddings_pool_the_last_token(client):
    response = client.embeddings.create(model=PRIMARY, input=["hello there", "general kenobi"])
    vectors = [d.embedding for d in response.data]
    assert len(vectors) == 2 and len(vectors[0]) == 576  # SmolLM2-135M's hidden size
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-4 for v in vectors)  # normalized
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$", text, re.M)
    assert m, f"{name} missing"
    return float(m.group(1))


def test_metrics_content(server, client):
    before = httpx.get(server.url + "/metrics").text
    client.completions.create(model=PRIMARY, prompt="Count: one, two,", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    assert "text/plain" in httpx.get(server.url + "/metrics").headers["content-type"]
    for name in ("llm:num_requests_running", "llm:num_requests_waiting", "llm:kv_cache_usage_perc",
                 "llm:prefix_cache_queries_total", "llm:prefix_cache_hits_total", "llm:num_preemptions_total"):
        assert f"# TYPE {name} " in text, name
    assert _metric(text, "llm:generation_tokens_total") >= _metric(before, "llm:generation_tokens_total") + 5
    assert _metric(text, "llm:prompt_tokens_total") > 0
    for hist in ("llm:time_to_first_token_seconds", "llm:inter_token_latency_seconds",
                 "llm:e2e_request_latency_seconds"):
        assert f"# TYPE {hist} histogram" in text
        assert _metric(text, hist + "_count") > _metric(before, hist + "_count") - 1
        assert _metric(text, hist + "_bucket", 'le="+Inf"') == _metric(text, hist + "_count")
    assert _metric(text, "llm:e2e_request_latency_seconds_count") >= \
        _metric(before, "llm:e2e_request_latency_seconds_count") + 1
    assert _metric(text, "llm:request_success_total", 'finished_reason="length"') >= 1
    assert _metric(text, "llm:kv_cache_usage_perc") == 0.0 and _metric(text, "llm:num_requests_running") == 0
