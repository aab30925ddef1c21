"""Benchmark metrics as pure functions, with the definitions `vllm bench serve` uses."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

DEFAULT_PERCENTILES = (99.0,)


@dataclass(frozen=True, slots=True)
class RequestResult:
    """What the client saw of one request (times in seconds, from time.perf_counter)."""
    success: bool
    prompt_len: int = 0           # prompt tokens (the server's usage when reported, else the dataset's)
    output_len: int = 0           # generated tokens (the server's usage when reported, else counted)
    ttft: float = 0.0             # send -> first chunk carrying generated output
    itl: tuple[float, ...] = ()   # gaps between successive output chunks
    latency: float = 0.0          # E2EL: send -> last chunk of the stream
    start_time: float = 0.0
    output_chunks: int = 0        # streamed chunks that carried output (a token each, on most servers)
    generated_text: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class Stats:
    """Summary of one latency metric, in milliseconds; percentiles as (p, value) pairs."""
    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class ServeMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    request_throughput: float      # completed requests / duration
    request_goodput: float | None  # requests meeting every SLO / duration (None without SLOs)
    output_throughput: float       # output tokens / duration
    total_token_throughput: float  # (input + output tokens) / duration
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats
    max_output_tokens_per_s: float   # busiest one-second bucket of output tokens
    max_concurrent_requests: int     # most requests in flight within one second


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between order statistics (numpy's default method)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values_s: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Stats:
    """Mean, median, population std and percentiles of times in seconds, reported in ms (empty -> zeros)."""
    if not values_s:
        return Stats(0.0, 0.0, 0.0, tuple((float(p), 0.0) for p in percentiles))
    n = len(values_s)
    mean = sum(values_s) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values_s) / n)
    return Stats(mean * 1000, percentile(values_s, 50) * 1000, std * 1000,
                 tuple((float(p), percentile(values_s, p) * 1000) for p in percentiles))


def request_tpot(result: RequestResult) -> float | None:
    """Time per output token excluding the first: (E2EL - TTFT) / (output_len - 1); None below 2 tokens."""
    if not result.success or result.output_len <= 1:
        return None
    return (result.latency - result.ttft) / (result.output_len - 1)


def peak_rates(results: Sequence[RequestResult]) -> tuple[float, int]:
    """(most output tokens in one whole second, most requests active in one second), counting seconds
    from the first request's start; a token's time is start + ttft + the running sum of its gaps."""
    done = [r for r in results if r.success]
    if not done:
        return 0.0, 0
    t0 = min(r.start_time for r in done)
    num_seconds = int(math.ceil(max(r.start_time + r.latency for r in done) - t0)) + 1
    tokens = [0] * num_seconds
    active = [0] * num_seconds
    for r in done:
        t = r.start_time + r.ttft
        for gap in (0.0, *r.itl):
            t += gap
            bucket = int(t - t0)
            if 0 <= bucket < num_seconds:
                tokens[bucket] += 1
        for second in range(int(r.start_time - t0), int(r.start_time + r.latency - t0) + 1):
            active[second] += 1
    return float(max(tokens)), max(active)


def meets_slos(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    """Whether a request is within every SLO (keys ttft, tpot, e2el; values in ms). A request with fewer
    than two tokens counts as TPOT 0, as vLLM does."""
    values = {"ttft": result.ttft, "tpot": request_tpot(result) or 0.0, "e2el": result.latency}
    return all(values[key] * 1000 <= limit for key, limit in slos_ms.items())


def compute_serve_metrics(results: Sequence[RequestResult], duration_s: float,
                          percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                          slos_ms: dict[str, float] | None = None) -> ServeMetrics:
    """All serving metrics over the successful requests of one run of `duration_s` seconds."""
    assert duration_s > 0, "a benchmark run has a positive duration"
    done = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_len for r in done)
    tpots = [t for t in (request_tpot(r) for r in done) if t is not None]
    itls = [gap for r in done for gap in r.itl]
    peak_tokens, peak_active = peak_rates(done)
    goodput = (sum(meets_slos(r, slos_ms) for r in done) / duration_s) if slos_ms else None
    return ServeMetrics(
        completed=len(done), failed=len(results) - len(done),
        total_input=total_input, total_output=total_output,
        request_throughput=len(done) / duration_s, request_goodput=goodput,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        ttft=summarize([r.ttft for r in done], percentiles), tpot=summarize(tpots, percentiles),
        itl=summarize(itls, percentiles), e2el=summarize([r.latency for r in done], percentiles),
        max_output_tokens_per_s=peak_tokens, max_concurrent_requests=peak_active)


def offline_throughput(num_requests: int, prompt_tokens: int, output_tokens: int,
                       elapsed_s: float) -> dict[str, float]:
    """`llm bench throughput` numbers: requests/s, total tokens/s and output tokens/s over one run."""
    assert elapsed_s > 0
    return {"elapsed_time": elapsed_s, "num_requests": num_requests,
            "total_num_tokens": prompt_tokens + output_tokens,
            "requests_per_second": num_requests / elapsed_s,
            "tokens_per_second": (prompt_tokens + output_tokens) / elapsed_s,
            "output_tokens_per_second": output_tokens / elapsed_s}


def latency_summary(latencies_s: Sequence[float],
                    percentiles: Sequence[float] = (10, 25, 50, 75, 90, 99)) -> dict[str, object]:
    """`llm bench latency` numbers: mean and percentiles of whole-batch latencies, in seconds."""
    return {"avg_latency": sum(latencies_s) / len(latencies_s) if latencies_s else 0.0,
            "latencies": list(latencies_s),
            "percentiles": {str(p): percentile(latencies_s, p) for p in percentiles}}
