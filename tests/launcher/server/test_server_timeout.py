"""Server limits: request_timeout_s (408, KV blocks freed) and max_queued_requests (503 queue_full)."""
import json
import re
import time

import httpx
import pytest

from tests.launcher.server.conftest import PRIMARY, start_server

LONG = {"model": PRIMARY, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True}


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
""", tmp_path_factory.mktemp("timeout"), model_path=default_gguf_path, server_extra="request_timeout_s = 3\nmax_queued_requests = 2")
    try:
        yield srv
    finally:
        srv.stop()


def blocks_used(srv) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return float(re.search(r"^llm:kv_cache_blocks_used\{[^}]*\} (\S+)$", text, re.M).group(1))


def test_non_streaming_request_times_out_with_408(short_timeout_server):
    srv = short_timeout_server
    start = time.monotonic()
    r = httpx.post(srv.url + "/v1/completions", json=LONG, headers=srv.auth, timeout=60)
    assert r.status_code == 408, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - start < 15
    for _ in range(50):
        if blocks_used(srv) == 0:
            break
        time.sleep(0.1)
    assert blocks_used(srv) == 0


def test_stream_ends_with_an_error_event_then_done(short_timeout_server):
    srv = short_timeout_server
    with httpx.stream("POST", srv.url + "/v1/completions", json={**LONG, "stream": True}, headers=srv.auth,
                      timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == "request_timeout"
    assert len(events) > 3  # some tokens streamed before the limit
    quick = httpx.post(srv.url + "/v1/completions", headers=srv.auth, timeout=60,
                       json={"model": PRIMARY, "prompt": "Hi", "max_tokens": 4})
    assert quick.status_code == 200


def test_a_full_queue_answers_503_and_recovers(short_timeout_server):
    import asyncio
    srv = short_timeout_server

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(srv.url + "/v1/completions", json=LONG, headers=srv.auth)
                                          for _ in range(6)))

    statuses = sorted(r.status_code for r in asyncio.run(burst()))
    assert statuses.count(503) >= 1 and set(statuses) <= {408, 503}, statuses
    refused = next(r for r in asyncio.run(burst()) if r.status_code == 503)
    assert refused.json()["error"]["code"] == "queue_full" and "retry-after" in refused.headers
    ok = httpx.post(srv.url + "/v1/completions", headers=srv.auth, timeout=60,
                    json={"model": PRIMARY, "prompt": "Hi", "max_tokens": 4})
    assert ok.status_code == 200
