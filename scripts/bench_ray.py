#!/usr/bin/env python3
"""Ray Serve replicas on this machine: `llm bench serve` at concurrency 32 against one `llm serve` of the default
model (no Ray) and against two Ray Serve replicas of it behind one address ([distributed] replicas = 2), one
after the other, the same requests; requests/s, output tokens/s and TTFT.

    scripts/test_ray --co -q >/dev/null   # installs Ray Serve into the venv once (or: pip install 'llm-serve[ray]')
    .venv/bin/python scripts/bench_ray.py [--num-prompts 128] [--json out.json]

On a host with fewer cores than replicas x the engine's threads, replicas share the cores: the figure says what
Serve's proxy and a second engine cost there, not what a second machine adds. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_servers import bench_serve, free_port, start_llm, stop, wait_ready  # noqa: E402
from engine.weights import DEFAULT_MODEL  # noqa: E402

PROFILE = f'[model]\nsource = "{DEFAULT_MODEL}"\n\n[engine]\nmax_num_seqs = 32\n'


def start_ray(folder: Path, replicas: int) -> tuple[subprocess.Popen, str, float]:
    """`llm serve` of the profile with [distributed] replicas (Ray Serve), once ready through the proxy."""
    port = free_port()
    path = folder / f"ray{port}.toml"
    path.write_text(PROFILE + f'\n[distributed]\nreplicas = {replicas}\n\n[server]\nhost = "127.0.0.1"\nport = {port}\n')
    log = folder / f"ray{port}.log"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log, timeout_s=600)
    return proc, url, time.monotonic() - started


def run(url: str, out: Path, num_prompts: int) -> dict:
    bench_serve(url, out.with_suffix(".warm.json"), "--num-prompts", "8", "--input-len", "128", "--output-len", "16",
                "--ignore-eos", "--tokenizer", "words")
    r = bench_serve(url, out, "--num-prompts", str(num_prompts), "--input-len", "128", "--output-len", "64",
                    "--ignore-eos", "--max-concurrency", "32", "--tokenizer", "words")
    return {k: r[k] for k in ("request_throughput", "output_throughput", "mean_ttft_ms", "completed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        folder = Path(tmp)
        proc, url = start_llm(PROFILE, folder)
        try:
            results["one server"] = run(url, folder / "one.json", args.num_prompts)
        finally:
            stop(proc)
        proc, url, ready_s = start_ray(folder, 2)
        try:
            results["two Ray replicas"] = {**run(url, folder / "two.json", args.num_prompts), "ready_s": ready_s}
        finally:
            stop(proc, timeout_s=120)
    print(f"{args.num_prompts} requests, 128 prompt / 64 output tokens, concurrency 32, {DEFAULT_MODEL}")
    print("| setup | requests/s | output tok/s | TTFT mean |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | {r['mean_ttft_ms']:.0f} ms |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
