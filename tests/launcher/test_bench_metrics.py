"""Bench metrics on hand-computed timings, workload generation, and the client's timing over a real socket."""
import asyncio
import json
import math
import random
import time

import numpy as np
import pytest

from launcher.bench import BenchError
from launcher.bench.client import Target, chunk_output, stream_request, httpx
from launcher.bench.dataset import WordTokenizer, arrival_times, build_requests, prompt_of_length
from launcher.bench.metrics import (RequestResult, compute_serve_metrics, latency_summary, offline_throughput,
                                    peak_rates, percentile, request_tpot, summarize)
from launcher.bench.serve import ServeBenchConfig, benchmark

# Four requests over a 2 s run (times in s). A: 4 tokens, B: 2 tokens, C: 1 token, D failed.
A = RequestResult(True, prompt_len=10, output_len=4, ttft=0.1, itl=(0.02, 0.03, 0.05), latency=0.2, start_time=0.0)
B = RequestResult(True, prompt_len=20, output_len=2, ttft=0.3, itl=(0.1,), latency=0.4, start_time=0.5)
C = RequestResult(True, prompt_len=5, output_len=1, ttft=0.2, itl=(), latency=0.2, start_time=1.0)
D = RequestResult(False, prompt_len=7, error="HTTP 500")


def test_serve_metrics_by_hand():
    m = compute_serve_metrics([A, B, C, D], duration_s=2.0, percentiles=(50, 99))
    assert (m.completed, m.failed, m.total_input, m.total_output) == (3, 1, 35, 7)
    assert m.request_throughput == pytest.approx(1.5)        # 3 requests / 2 s
    assert m.output_throughput == pytest.approx(3.5)         # 7 tokens / 2 s
    assert m.total_token_throughput == pytest.approx(21.0)   # (35 + 7) / 2 s
    # TTFT 100, 300, 200 ms: std = sqrt((100^2 + 100^2 + 0) / 3); p99 = 200 + 0.98 * 100
    assert (m.ttft.mean, m.ttft.median) == pytest.approx((200.0, 200.0))
    assert m.ttft.std == pytest.approx(math.sqrt(20000 / 3))
    assert dict(m.ttft.percentiles) == pytest.approx({50.0: 200.0, 99.0: 298.0})
    # TPOT excludes the first token: A (200-100)/3, B (400-300)/1; C (one token) has none
    assert m.tpot.mean == pytest.approx((100 / 3 + 100) / 2)
    assert m.tpot.std == pytest.approx((100 - 100 / 3) / 2)
    assert dict(m.tpot.percentiles)[99.0] == pytest.approx(100 / 3 + 0.99 * (100 - 100 / 3))
    # ITL pools every gap: 20, 30, 50, 100 ms
    assert (m.itl.mean, m.itl.median) == pytest.approx((50.0, 40.0))
    assert m.itl.std == pytest.approx(math.sqrt(950.0))
    assert dict(m.itl.percentiles)[99.0] == pytest.approx(50 + 0.97 * 50)
    # E2EL 200, 400, 200 ms
    assert (m.e2el.mean, m.e2el.median) == pytest.approx((800 / 3, 200.0))
    assert dict(m.e2el.percentiles)[99.0] == pytest.approx(396.0)
    # tokens at 0.1, 0.12, 0.15, 0.2 (A), 0.8, 0.9 (B) in second 0; 1.2 (C) in second 1
    assert (m.max_output_tokens_per_s, m.max_concurrent_requests) == (6.0, 2)
    assert m.request_goodput is None


def test_goodput_counts_requests_within_every_slo():
    results = [A, B, C, D]
    assert compute_serve_metrics(results, 2.0, slos_ms={"ttft": 250}).request_goodput == pytest.approx(1.0)
    # A's TPOT is 33.3 ms; C has one token, so TPOT 0 (as vLLM counts it)
    assert compute_serve_metrics(results, 2.0, slos_ms={"ttft": 250, "tpot": 30}).request_goodput == \
        pytest.approx(0.5)


def test_tpot_and_empty_inputs():
    assert request_tpot(A) == pytest.approx(0.1 / 3)
    assert request_tpot(C) is None and request_tpot(D) is None
    empty = compute_serve_metrics([D], 1.0)
    assert (empty.completed, empty.failed, empty.ttft.mean, empty.itl.percentiles) == (0, 1, 0.0, ((99.0, 0.0),))
    assert peak_rates([]) == (0.0, 0)


def test_percentile_and_std_match_numpy():
    rng = random.Random(3)
    for n in (1, 2, 7, 100):
        values = [rng.expovariate(5.0) for _ in range(n)]
        for p in (0, 10, 50, 90, 99, 99.9, 100):
            assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
        stats = summarize(values, (99,))
        assert stats.std == pytest.approx(float(np.std(values)) * 1000)
        assert stats.median == pytest.approx(float(np.median(values)) * 1000)


def test_offline_numbers():
    r = offline_throughput(num_requests=10, prompt_tokens=1000, output_tokens=500, elapsed_s=4.0)
    assert (r["requests_per_second"], r["tokens_per_second"], r["output_tokens_per_second"]) == (2.5, 375.0, 125.0)
    lat = latency_summary([1.0, 2.0, 3.0, 4.0], percentiles=(50, 90))
    assert lat["avg_latency"] == 2.5 and lat["percentiles"] == pytest.approx({"50": 2.5, "90": 3.7})


def test_arrivals_poisson_and_rescaled():
    assert arrival_times(5, float("inf"), random.Random(0)) == [0.0] * 5
    times = arrival_times(8, 4.0, random.Random(0))
    assert times == sorted(times) and times[-1] == pytest.approx(2.0)   # n / rate
    gaps = np.diff([0.0] + arrival_times(20000, 10.0, random.Random(1)))
    assert gaps.mean() == pytest.approx(0.1, rel=0.01)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)     # exponential gaps: CV 1
    even = np.diff([0.0] + arrival_times(20000, 10.0, random.Random(1), burstiness=100.0))
    assert even.std() / even.mean() == pytest.approx(0.1, abs=0.01)     # Gamma(k): CV 1/sqrt(k)


def test_datasets_with_word_counts():
    tok = WordTokenizer()
    reqs = build_requests("random", 20, 50, 7, tok, seed=1)
    assert all(r.prompt_len == 50 == len(r.prompt.split()) and r.output_len == 7 for r in reqs)
    assert len({r.prompt for r in reqs}) == 20
    fixed = build_requests("fixed", 5, 30, 4, tok, seed=1)
    assert len({r.prompt for r in fixed}) == 1 and fixed[0].prompt_len == 30
    spread = build_requests("random", 200, 100, 10, tok, seed=2, range_ratio=0.5)
    assert min(r.prompt_len for r in spread) >= 50 and max(r.prompt_len for r in spread) <= 150
    assert len({r.prompt_len for r in spread}) > 20
    assert build_requests("random", 3, 10, 2, tok, seed=5) == build_requests("random", 3, 10, 2, tok, seed=5)


def test_prompt_length_with_a_real_tokenizer(minilm_dir):
    from tokenizers import Tokenizer
    backend = Tokenizer.from_file(f"{minilm_dir}/tokenizer.json")
    capped = Tokenizer.from_file(f"{minilm_dir}/tokenizer.json")   # pads and truncates to 128, as shipped
    backend.no_truncation()
    backend.no_padding()

    class HF:
        def encode(self, text):
            return backend.encode(text, add_special_tokens=False).ids

        def decode(self, ids):
            return backend.decode(ids)

    for target in (1, 17, 128, 300):
        text, length = prompt_of_length(HF(), target, random.Random(target))
        assert length == len(backend.encode(text, add_special_tokens=False).ids)
        assert abs(length - target) <= 2

    class Capped(HF):
        def encode(self, text):
            return capped.encode(text, add_special_tokens=False).ids

    with pytest.raises(BenchError, match="returns at most 128 tokens"):
        prompt_of_length(Capped(), 300, random.Random(0))


def test_chunk_output_shapes():
    assert chunk_output({"choices": [{"text": "hi", "index": 0}]}) == "hi"
    assert chunk_output({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert chunk_output({"choices": [{"delta": {"content": "yo"}}]}) == "yo"
    calls = {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}}]}
    assert chunk_output(calls) == "{\"a\""
    assert chunk_output({"choices": [], "usage": {"completion_tokens": 3}}) is None


# --- the client over a real socket, against a scripted SSE stream with known delays ---------------------

GAPS = (0.15, 0.05, 0.10)   # server waits before each content chunk


async def _scripted_server(reader, writer):
    """Speaks just enough HTTP/1.1: /v1/models, no /tokenize, and a streamed completion with usage."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                   if line.lower().startswith("content-length")), 0)
    body = json.loads(await reader.readexactly(length)) if length else {}
    path = head.split(" ")[1]
    if path == "/v1/models":
        payload = json.dumps({"object": "list", "data": [{"id": "scripted"}]}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(payload), payload))
    elif path == "/v1/completions" and body.get("stream"):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        writer.write(b": ping\n\n")
        for i, gap in enumerate(GAPS):
            await asyncio.sleep(gap)
            writer.write(b"data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i} "}]}).encode() + b"\n\n")
            await writer.drain()
        usage = {"prompt_tokens": 11, "completion_tokens": len(GAPS), "total_tokens": 11 + len(GAPS)}
        writer.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
    else:
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    writer.close()


async def _with_server(coro_factory):
    server = await asyncio.start_server(_scripted_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await coro_factory(f"http://127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()


def test_client_times_a_stream():
    async def run(url):
        async with httpx.AsyncClient() as client:
            return await stream_request(client, Target(url, "completions", "scripted"), "p", 3, 3)

    r = asyncio.run(_with_server(run))
    assert r.success, r.error
    assert (r.prompt_len, r.output_len, r.generated_text) == (11, 3, "t0 t1 t2 ")
    # a chunk cannot arrive before the server sends it; lateness is bounded loosely (shared CI cores)
    assert GAPS[0] - 0.005 <= r.ttft <= GAPS[0] + 0.1
    assert r.itl == pytest.approx(GAPS[1:], abs=0.1) and len(r.itl) == len(GAPS) - 1
    assert sum(GAPS) - 0.005 <= r.ttft + sum(r.itl) <= r.latency <= sum(GAPS) + 0.2


def test_benchmark_end_to_end_on_scripted_server(tmp_path):
    out = tmp_path / "r.json"

    async def run(url):
        config = ServeBenchConfig(url=url + "/v1", num_prompts=4, input_len=8, output_len=3, request_rate=20.0,
                                  max_concurrency=2, progress=False, result_json=str(out), percentiles=(50, 99))
        return await benchmark(config)

    start = time.perf_counter()
    result = asyncio.run(_with_server(run))
    assert time.perf_counter() - start < 10
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (result["model"], result["tokenizer"], result["completed"], result["failed"]) == ("scripted", "words", 4, 0)
    assert result["total_input_tokens"] == 44 and result["total_output_tokens"] == 12   # from usage
    for key in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p99"):
            assert f"{stat}_{key}_ms" in result
    assert result["mean_ttft_ms"] == pytest.approx(150, abs=40)
    assert result["mean_tpot_ms"] == pytest.approx(75, abs=30)     # (E2EL - TTFT) / (3 - 1)
    # at most two in flight: four 0.3 s requests need at least two rounds
    assert result["duration"] >= 0.6 and result["max_concurrent_requests"] <= 4
