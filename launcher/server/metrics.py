"""Prometheus metrics (text format written by hand) under the `llm:` prefix, named as vLLM names them."""
from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter

from engine.messages import EngineStats

PREFIX = "llm:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class Histogram:
    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.buckets = name, doc, buckets
        self.counts = [0] * (len(buckets) + 1)   # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: str, with_header: bool = True) -> list[str]:
        full = PREFIX + self.name
        lines = [f"# HELP {full} {self.doc}", f"# TYPE {full} histogram"] if with_header else []
        cumulative = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f'{full}_bucket{{{labels},le="{le}"}} {cumulative}')
        lines += [f"{full}_sum{{{labels}}} {self.sum}", f"{full}_count{{{labels}}} {self.count}"]
        return lines


class ModelMetrics:
    """What the server measures of one model's requests: latency and size histograms, finish reasons."""

    def __init__(self, model_name: str):
        self.labels = f'model_name="{_escape(model_name)}"'
        self.ttft = Histogram("time_to_first_token_seconds", "Time to first token in seconds.", _LATENCY_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Time between output tokens in seconds.",
                             _LATENCY_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                             _LATENCY_BUCKETS)
        self.prompt_hist = Histogram("request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS)
        self.gen_hist = Histogram("request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS)
        self.finished: Counter[str] = Counter()    # finished_reason -> count

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    @property
    def histograms(self) -> tuple[Histogram, ...]:
        return (self.ttft, self.itl, self.e2e, self.prompt_hist, self.gen_hist)


# (name, type, help, value of the engine's stats) for the gauges and counters the engine reports
_ENGINE_METRICS = (
    ("num_requests_running", "gauge", "Sequences in the running batch.", lambda s: s.scheduler.num_running),
    ("num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", lambda s: s.scheduler.num_waiting),
    ("kv_cache_usage_perc", "gauge", "KV-cache usage; 1 means 100 percent.", lambda s: s.scheduler.kv_cache_usage),
    ("kv_cache_blocks_used", "gauge", "KV-cache blocks held by live sequences.",
     lambda s: s.scheduler.num_blocks_used),
    ("kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", lambda s: s.scheduler.num_blocks_total),
    ("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
     lambda s: s.scheduler.prefix_cache_queries),
    ("prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.",
     lambda s: s.scheduler.prefix_cache_hits),
    ("mm_cache_queries_total", "counter", "Images a prefill needed embeddings of (vision models).",
     lambda s: s.num_images_encoded + s.num_image_cache_hits),
    ("mm_cache_hits_total", "counter", "Of those, images whose embeddings were cached (not re-encoded).",
     lambda s: s.num_image_cache_hits),
    ("num_preemptions_total", "counter", "Cumulative preemptions.", lambda s: s.scheduler.num_preemptions),
    ("prompt_tokens_total", "counter", "Prompt tokens processed.", lambda s: s.scheduler.num_prompt_tokens),
    ("generation_tokens_total", "counter", "Generation tokens produced.",
     lambda s: s.scheduler.num_generation_tokens),
)


def render(models: list[tuple[ModelMetrics, EngineStats]], num_in_flight: int,
           http: Counter[tuple[str, int]], replica_id: str = "") -> str:
    """The Prometheus text: each metric once, with one sample per model (its model_name label); under Ray Serve
    a replica_info gauge names the replica that answered."""
    lines: list[str] = []

    def header(name: str, kind: str, doc: str) -> str:
        full = PREFIX + name
        lines.extend([f"# HELP {full} {doc}", f"# TYPE {full} {kind}"])
        return full

    for name, kind, doc, value in _ENGINE_METRICS:
        full = header(name, kind, doc)
        lines.extend(f"{full}{{{m.labels}}} {value(stats)}" for m, stats in models)
    if replica_id:
        full = header("replica_info", "gauge", "The Ray Serve replica these figures are from.")
        lines.append(f'{full}{{replica_id="{_escape(replica_id)}"}} 1')
    full = header("num_requests_in_flight", "gauge", "HTTP generation requests being served.")
    lines.append(f"{full} {num_in_flight}")
    full = header("request_success_total", "counter", "Finished requests by finish reason.")
    for m, _ in models:
        for reason in sorted(set(m.finished) | {"stop", "length", "abort"}):
            lines.append(f'{full}{{{m.labels},finished_reason="{reason}"}} {m.finished[reason]}')
    full = header("http_requests_total", "counter", "HTTP requests by route and status.")
    for (route, status), n in sorted(http.items()):
        lines.append(f'{full}{{route="{_escape(route)}",status="{status}"}} {n}')
    for same_metric in zip(*(m.histograms for m, _ in models)):
        for i, (hist, (m, _)) in enumerate(zip(same_metric, models)):
            lines += hist.render(m.labels, with_header=i == 0)
    return "\n".join(lines) + "\n"


class RequestTimer:
    """Times one request: first token, gaps between tokens, end to end."""

    def __init__(self, metrics: ModelMetrics):
        self._metrics = metrics
        self._start = self._last = time.monotonic()
        self._first = True

    def tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.monotonic()
        if self._first:
            self._metrics.ttft.observe(now - self._start)
            self._first = False
        else:
            self._metrics.itl.observe(now - self._last)
        self._last = now

    def finish(self, reason: str, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        m = self._metrics
        m.e2e.observe(time.monotonic() - self._start)
        m.prompt_hist.observe(num_prompt_tokens)
        m.gen_hist.observe(num_generation_tokens)
        m.finished[reason] += 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
