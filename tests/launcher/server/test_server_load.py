"""Client disconnects abort engine requests; 200 concurrent streams with 30% leaving early all end cleanly."""
from __future__ import annotations

import asyncio
import re
import time

import httpx
import orjson

from tests.launcher.server.conftest import PRIMARY

NUM_CLIENTS = 200
LEAVE_EVERY = 10          # clients 0, 3, 6 of every 10 leave early: 30%
LEAVERS = (0, 3, 6)


def _gauge(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def _wait_idle(server, timeout: float = 30.0) -> tuple[float, float, float]:
    deadline = time.monotonic() + timeout
    while True:
        values = (_gauge(server, "llm:kv_cache_blocks_used"), _gauge(server, "llm:num_requests_running"),
                  _gauge(server, "llm:num_requests_waiting"))
        if values == (0, 0, 0) or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


def test_disconnect_aborts_engine_request(server):
    body = {"model": PRIMARY, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 1500, "stream": True, "temperature": 0.7, "ignore_eos": True}
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", server.base_url + "/chat/completions", json=body, headers=server.auth) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                    if got == 3:
                        # NOTE: checked inside the loop: leaving iter_lines closes the connection.
                        assert _gauge(server, "llm:kv_cache_blocks_used") > 0   # running while we read
                        break
    left = time.monotonic()
    assert _wait_idle(server) == (0, 0, 0)
    # 1500 tokens would take far longer than this: the request was aborted, not run to the end.
    assert time.monotonic() - left < 20


async def _one(client: httpx.AsyncClient, server, i: int) -> str:
    # Short prompts sharing the template's system block keep prefill small on a 2-core CPU.
    body = {"model": PRIMARY, "messages": [{"role": "user", "content": f"Hi {i}"}],
            "max_tokens": 8, "stream": True, "temperature": 0.8, "seed": i}
    leave = i % LEAVE_EVERY in LEAVERS
    async with client.stream("POST", server.base_url + "/chat/completions", json=body, headers=server.auth) as r:
        assert r.status_code == 200, await r.aread()
        finish, done = None, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                break
            chunk = orjson.loads(payload)
            assert "error" not in chunk, chunk
            if leave and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                return "left"   # leaving the block closes the connection mid-stream
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                finish = chunk["choices"][0]["finish_reason"]
    assert done and finish in ("stop", "length"), (done, finish)
    return "completed"


def test_200_concurrent_streams_with_early_disconnects(server):
    async def run():
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=170, limits=limits) as client:
            return await asyncio.gather(*(_one(client, server, i) for i in range(NUM_CLIENTS)))

    outcomes = asyncio.run(run())
    assert outcomes.count("left") == NUM_CLIENTS * len(LEAVERS) // LEAVE_EVERY
    assert outcomes.count("completed") == NUM_CLIENTS - outcomes.count("left")
    assert _wait_idle(server) == (0, 0, 0)
    assert httpx.get(server.url + "/health").status_code == 200
