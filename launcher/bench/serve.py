"""`llm bench serve`: drive any OpenAI-compatible server with timed streaming requests and report."""
from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from launcher.bench import BenchError
from launcher.bench.client import ServerTokenizer, Target, base_url, fetch_first_model, httpx, stream_request
from launcher.bench.dataset import WordTokenizer, arrival_times, build_requests
from launcher.bench.metrics import RequestResult, compute_serve_metrics
from launcher.bench import report


@dataclass(frozen=True, slots=True)
class ServeBenchConfig:
    """Everything one `llm bench serve` run needs (the CLI flags, one to one)."""
    url: str = "http://127.0.0.1:8000"
    model: str | None = None              # None: the first id in GET /v1/models
    endpoint: str = "completions"         # completions | chat
    dataset: str = "random"               # random | fixed
    num_prompts: int = 100
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    request_rate: float = float("inf")    # requests/s; inf sends all at once
    burstiness: float = 1.0               # 1: Poisson arrivals
    max_concurrency: int | None = None
    ignore_eos: bool = False
    seed: int = 0
    api_key: str | None = None
    percentiles: tuple[float, ...] = (99.0,)
    slos_ms: dict[str, float] = field(default_factory=dict)   # goodput SLOs: ttft / tpot / e2el
    extra_body: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "auto"               # auto (server /tokenize if offered, else words) | server | words
    result_json: str | None = None
    plot: str | None = None
    progress: bool = True
    timeout_s: float = 6 * 3600.0
    ready_timeout_s: float = 600.0        # wait this long for a server still starting (503) to be ready

    def validate(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise BenchError(f"--endpoint must be completions or chat, got {self.endpoint!r}")
        if self.dataset not in ("random", "fixed"):
            raise BenchError(f"--dataset must be random or fixed, got {self.dataset!r}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise BenchError("--num-prompts, --input-len and --output-len must be at least 1")
        if not self.request_rate > 0 or not self.burstiness > 0:
            raise BenchError("--request-rate and --burstiness must be positive (rate may be inf)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchError("--max-concurrency must be at least 1")
        if not 0 <= self.range_ratio < 1:
            raise BenchError("--range-ratio must be in [0, 1)")
        if self.tokenizer not in ("auto", "server", "words"):
            raise BenchError(f"--tokenizer must be auto, server or words, got {self.tokenizer!r}")
        if set(self.slos_ms) - {"ttft", "tpot", "e2el"}:
            raise BenchError("--goodput keys are ttft, tpot and e2el (values in ms)")


def _log(config: ServeBenchConfig, message: str) -> None:
    if config.progress:
        print(message, file=sys.stderr)


def _pick_tokenizer(config: ServeBenchConfig, model: str) -> tuple[Any, str]:
    server = ServerTokenizer(config.url, model, config.api_key)
    if config.tokenizer == "words":
        return WordTokenizer(), "words"
    if server.available():
        return server, "server"
    if config.tokenizer == "server":
        raise BenchError(f"{base_url(config.url)} does not answer /tokenize and /detokenize")
    # NOTE: said even with progress off: prompt lengths counted in words are not comparable with another
    # server's counted in tokens (pass --tokenizer words to both, or --tokenizer server to insist)
    print(f"llm bench: warning: {base_url(config.url)} does not tokenize in vLLM's or llama.cpp's shape; prompt "
          "and output lengths are approximated by word counts", file=sys.stderr)
    return WordTokenizer(), "words"


def count_outputs(results: Sequence[RequestResult], tokenizer: Any, kind: str) -> list[RequestResult]:
    """Fill output_len where the server sent no usage: re-tokenize the text with the server's tokenizer,
    else count the chunks that carried output."""
    counted = []
    for r in results:
        if r.success and r.output_len == 0:
            n = len(tokenizer.encode(r.generated_text)) if kind == "server" else r.output_chunks
            r = replace(r, output_len=n)
        counted.append(r)
    return counted


async def benchmark(config: ServeBenchConfig) -> dict[str, Any]:
    """Run one benchmark and return the results dict (also printed, and written/plotted when asked).
    Importable for tests: `asyncio.run(benchmark(ServeBenchConfig(url=..., progress=False)))`."""
    config.validate()
    if config.plot:
        report.check_plot_available()
    try:
        model = config.model or await asyncio.to_thread(fetch_first_model, config.url, config.api_key)
    except OSError as exc:
        raise BenchError(f"cannot reach {base_url(config.url)}: {exc}") from None
    target = Target(config.url, config.endpoint, model, config.api_key, config.ignore_eos, config.extra_body)
    limit = config.max_concurrency or config.num_prompts
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=httpx.Timeout(config.timeout_s), limits=limits) as client:
        await _wait_ready(client, target, config)
        try:
            tokenizer, tokenizer_kind = await asyncio.to_thread(_pick_tokenizer, config, model)
            requests = await asyncio.to_thread(build_requests, config.dataset, config.num_prompts,
                                               config.input_len, config.output_len, tokenizer, config.seed,
                                               config.range_ratio)
        except OSError as exc:
            raise BenchError(f"cannot reach {base_url(config.url)}: {exc}") from None
        results, duration = await _run(client, target, requests, config)
    results = await asyncio.to_thread(count_outputs, results, tokenizer, tokenizer_kind)
    metrics = compute_serve_metrics(results, duration, config.percentiles, config.slos_ms or None)
    settings = {"url": base_url(config.url), "endpoint": config.endpoint, "model": model,
                "dataset": config.dataset, "num_prompts": config.num_prompts, "input_len": config.input_len,
                "output_len": config.output_len, "range_ratio": config.range_ratio,
                "request_rate": config.request_rate, "burstiness": config.burstiness,
                "max_concurrency": config.max_concurrency, "ignore_eos": config.ignore_eos,
                "seed": config.seed, "tokenizer": tokenizer_kind,
                "tokenizer_shape": getattr(tokenizer, "dialect", None), "percentiles": list(config.percentiles),
                "goodput_slos_ms": dict(config.slos_ms) or None}
    result = report.result_dict(settings, metrics, results, duration)
    if config.progress:
        print(report.format_table(result, config.percentiles))
        errors = [r.error for r in results if not r.success]
        if errors:
            print(f"first error ({len(errors)} failed): {errors[0]}", file=sys.stderr)
    if config.result_json:
        report.write_json(result, config.result_json)
    if config.plot:
        report.plot_latencies(result, config.plot)
    return result


async def _wait_ready(client: Any, target: Target, config: ServeBenchConfig) -> None:
    """One short test request, retried while the server answers 503 (still loading) for up to
    ready_timeout_s, so a benchmark can start right after the server does; other failures stop here."""
    _log(config, "Starting initial single prompt test run...")
    deadline = time.monotonic() + config.ready_timeout_s
    while True:
        test = await stream_request(client, target, "Hello, how are you?", 5, 4)
        if test.success:
            return
        if not test.error.startswith("HTTP 503") or time.monotonic() > deadline:
            raise BenchError(f"the test request to {target.request_url} failed: {test.error}")
        await asyncio.sleep(1.0)


async def _run(client: Any, target: Target, requests: list, config: ServeBenchConfig
               ) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival time (the concurrency cap waits inside each task, so a full
    server delays sends without shifting the schedule); returns results in request order and the duration."""
    from tqdm import tqdm
    offsets = arrival_times(len(requests), config.request_rate, random.Random(config.seed), config.burstiness)
    gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), disable=not config.progress, unit="req", file=sys.stderr)

    async def one(request: Any) -> RequestResult:
        async with gate:
            result = await stream_request(client, target, request.prompt, request.prompt_len, request.output_len)
        bar.update(1)
        return result

    _log(config, f"Traffic request rate: {config.request_rate}, burstiness {config.burstiness}, "
                 f"max concurrency: {config.max_concurrency}")
    start = time.perf_counter()
    tasks = []
    for request, offset in zip(requests, offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def main(config: ServeBenchConfig) -> dict[str, Any]:
    """Blocking entry point for the CLI."""
    return asyncio.run(benchmark(config))


