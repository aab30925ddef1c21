"""Benchmark output: the results dict (vLLM's JSON keys), the printed table, the JSON file and the PNG plot."""
from __future__ import annotations

import importlib.util
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from launcher.bench import BenchError
from launcher.bench.metrics import RequestResult, ServeMetrics, Stats, request_tpot

METRICS = (("ttft", "TTFT", "Time to First Token"), ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
           ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency"))


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def _json_number(x: float) -> float | str:
    return "inf" if math.isinf(x) else x  # NOTE: JSON has no Infinity; vLLM's files hold it, ours stay valid


def result_dict(settings: dict[str, Any], metrics: ServeMetrics, results: Sequence[RequestResult],
                duration_s: float) -> dict[str, Any]:
    """The results JSON: run settings, the totals and per-metric stats under vLLM's key names
    (mean_ttft_ms, p99_itl_ms ...), then per-request lists."""
    out: dict[str, Any] = {"date": datetime.now().strftime("%Y%m%d-%H%M%S")}
    out |= {k: _json_number(v) if isinstance(v, float) else v for k, v in settings.items()}
    out |= {"duration": duration_s, "completed": metrics.completed, "failed": metrics.failed,
            "total_input_tokens": metrics.total_input, "total_output_tokens": metrics.total_output,
            "request_throughput": metrics.request_throughput, "request_goodput": metrics.request_goodput,
            "output_throughput": metrics.output_throughput,
            "total_token_throughput": metrics.total_token_throughput,
            "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
            "max_concurrent_requests": metrics.max_concurrent_requests}
    for key, _, _ in METRICS:
        stats: Stats = getattr(metrics, key)
        out |= {f"mean_{key}_ms": stats.mean, f"median_{key}_ms": stats.median, f"std_{key}_ms": stats.std}
        out |= {f"p{_p_word(p)}_{key}_ms": value for p, value in stats.percentiles}
    out |= {"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_len for r in results],
            "ttfts": [r.ttft for r in results], "tpots": [request_tpot(r) for r in results],
            "itls": [list(r.itl) for r in results], "e2els": [r.latency for r in results],
            "generated_texts": [r.generated_text for r in results], "errors": [r.error for r in results]}
    return out


def format_table(result: dict[str, Any], percentiles: Sequence[float]) -> str:
    """The summary printed after a run, laid out like vLLM's."""
    rows = [f"{' Serving Benchmark Result ':=^60}"]

    def row(label: str, value: Any) -> None:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        rows.append(f"{label:<48} {shown:>11}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result.get("max_concurrency") is not None:
        row("Maximum request concurrency:", result["max_concurrency"])
    if result.get("request_rate") not in (None, "inf"):
        row("Request rate configured (RPS):", float(result["request_rate"]))
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    if result.get("request_goodput") is not None:
        row("Request goodput (req/s):", result["request_goodput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"])
    row("Peak concurrent requests:", result["max_concurrent_requests"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    for key, name, header in METRICS:
        rows.append(f"{header:-^60}")
        row(f"Mean {name} (ms):", result[f"mean_{key}_ms"])
        row(f"Median {name} (ms):", result[f"median_{key}_ms"])
        row(f"Std {name} (ms):", result[f"std_{key}_ms"])
        for p in percentiles:
            row(f"P{_p_word(p)} {name} (ms):", result[f"p{_p_word(p)}_{key}_ms"])
    rows.append("=" * 60)
    return "\n".join(rows)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2), encoding="utf-8")


def check_plot_available() -> None:
    """Fail before any load is sent when --plot was asked for and matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                         "(or drop --plot; the results JSON holds every per-request time)")


def plot_latencies(result: dict[str, Any], path: str | Path) -> None:
    """A PNG of four histograms: TTFT, TPOT, ITL and E2EL (ms), each with its median and p99 marked."""
    check_plot_available()
    import matplotlib
    matplotlib.use("Agg")  # NOTE: no display on servers
    import matplotlib.pyplot as plt

    series = {"TTFT": [t for t, e in zip(result["ttfts"], result["errors"]) if not e],
              "TPOT": [t for t in result["tpots"] if t is not None],
              "ITL": [gap for gaps in result["itls"] for gap in gaps],
              "E2EL": [t for t, e in zip(result["e2els"], result["errors"]) if not e]}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, values_s) in zip(axes.flat, series.items()):
        values = [v * 1000 for v in values_s]
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="#4477aa")
            for key, style in ((f"median_{name.lower()}_ms", "--"), (f"p99_{name.lower()}_ms", ":")):
                if key in result:
                    ax.axvline(result[key], color="#cc3311", linestyle=style, label=key.split("_")[0])
            ax.legend()
        ax.set_title(f"{name} (ms), n={len(values)}")
        ax.set_xlabel("ms")
    fig.suptitle(f"{result.get('model', '')}  {result.get('endpoint', '')}  "
                 f"rate={result.get('request_rate')}  concurrency={result.get('max_concurrency')}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
