"""Server limits: request_timeout_s (408, KV blocks freed) and max_queued_requests (503 queue_full).

Timing margins hold on a machine 5x slower or that busy: the limit (10 s) leaves room for many tokens
before it, the long request (4000 tokens) always outlasts it, and a short request is sent only once the
engine is idle again (waited on through /metrics, not a fixed sleep)."""
import asyncio
import json
import re
import time

import httpx
import pytest

from tests.launcher.server.conftest import PRIMARY, start_server

TIMEOUT_S = 10
LONG = {"model": PRIMARY, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True}
QUICK = {"model": PRIMARY, "prompt": "Hi", "max_tokens": 4}


@pytest.fixture(scope="module")
def short_timeout_server(default_gguf_path, tmp_path_factory):
    srv = start_server(f"""
[model]
source = "{default_gguf_path}"
served_names = ["{PRIMARY}"]
max_model_len = 4096

[engine]
device = "cpu"
kv_cache_gib = 0.25
""", tmp_path_factory.mktemp("timeout"), model_path=default_gguf_path,
        server_extra=f"request_timeout_s = {TIMEOUT_S}\nmax_queued_requests = 2")
    try:
        yield srv
    finally:
        srv.stop()


def gauge(srv, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    return float(re.search(rf"^llm:{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def wait_idle(srv, timeout_s: float = 60) -> bool:
    """Until the engine holds no blocks and runs nothing (aborted requests end within a step or two)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gauge(srv, "kv_cache_blocks_used") == 0 and gauge(srv, "num_requests_running") == 0:
            return True
        time.sleep(0.1)
    return False


def test_non_streaming_request_times_out_with_408(short_timeout_server):
    srv = short_timeout_server
    start = time.monotonic()
    r = httpx.post(srv.url + "/v1/completions", json=LONG, headers=srv.auth, timeout=120)
    assert r.status_code == 408, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + 30
    assert wait_idle(srv)


def test_stream_ends_with_an_error_event_then_done(short_timeout_server):
    srv = short_timeout_server
    with httpx.stream("POST", srv.url + "/v1/completions", json={**LONG, "stream": True}, headers=srv.auth,
                      timeout=120) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == "request_timeout"
    assert len(events) > 3  # some tokens streamed before the limit
    assert wait_idle(srv)
    quick = httpx.post(srv.url + "/v1/completions", headers=srv.auth, timeout=120, json=QUICK)
    assert quick.status_code == 200, quick.text


def test_a_full_queue_answers_503_and_recovers(short_timeout_server):
    srv = short_timeout_server

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(srv.url + "/v1/completions", json=LONG, headers=srv.auth)
                                          for _ in range(6)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(503) >= 1 and set(statuses) <= {408, 503}, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["error"]["code"] == "queue_full" and "retry-after" in refused.headers
    assert wait_idle(srv)
    ok = httpx.post(srv.url + "/v1/completions", headers=srv.auth, timeout=120, json=QUICK)
    assert ok.status_code == 200, ok.text
