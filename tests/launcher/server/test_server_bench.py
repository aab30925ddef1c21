"""`llm bench serve` against the live server: the CLI's results JSON and the importable coroutine, every metric
present and consistent with the per-request data it reports."""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.launcher.server.conftest import PRIMARY, REPO

LLM = Path(sys.executable).parent / "llm"
METRICS = ("ttft", "tpot", "itl", "e2el")


def check_result(result: dict, num_prompts: int, input_len: int, output_len: int, chat: bool = False) -> None:
    """Every metric is there, and each aggregate matches what the per-request lists say."""
    assert result["completed"] == num_prompts and result["failed"] == 0, result["errors"]
    assert result["errors"] == [""] * num_prompts
    duration = result["duration"]
    assert duration > 0
    # lengths: the server's usage; prompts were cut to input_len by the server's tokenizer (+-2 on re-encoding),
    # and chat adds its template's tokens (the same for every prompt)
    assert result["output_lens"] == [output_len] * num_prompts          # ignore_eos: exactly max_tokens
    extra = min(result["input_lens"]) - input_len if chat else 0
    assert extra >= 0 and all(abs(n - extra - input_len) <= 2 for n in result["input_lens"]), result["input_lens"]
    assert result["total_input_tokens"] == sum(result["input_lens"])
    assert result["total_output_tokens"] == num_prompts * output_len
    assert math.isclose(result["request_throughput"], num_prompts / duration)
    assert math.isclose(result["output_throughput"], result["total_output_tokens"] / duration)
    assert math.isclose(result["total_token_throughput"],
                        (result["total_input_tokens"] + result["total_output_tokens"]) / duration)
    ttfts, tpots, itls, e2els = result["ttfts"], result["tpots"], result["itls"], result["e2els"]
    for ttft, tpot, itl, e2el in zip(ttfts, tpots, itls, e2els):
        assert 0 < ttft < e2el <= duration
        assert math.isclose(tpot, (e2el - ttft) / (output_len - 1))     # TPOT excludes the first token
        assert 1 <= len(itl) <= output_len - 1                          # one gap per later chunk with output
        assert all(gap >= 0 for gap in itl) and sum(itl) <= e2el - ttft + 1e-9
    per_metric = {"ttft": ttfts, "tpot": tpots, "itl": [g for gaps in itls for g in gaps], "e2el": e2els}
    for key in METRICS:
        values_ms = np.array(per_metric[key]) * 1000
        for stat, expected in (("mean", values_ms.mean()), ("median", np.median(values_ms)),
                               ("std", values_ms.std()), ("p99", np.percentile(values_ms, 99))):
            assert math.isclose(result[f"{stat}_{key}_ms"], expected, rel_tol=1e-9, abs_tol=1e-9), (stat, key)
        assert result[f"mean_{key}_ms"] > 0
    assert result["max_output_tokens_per_s"] > 0 and 1 <= result["max_concurrent_requests"] <= len(ttfts)


def test_bench_serve_cli_writes_every_metric(server, tmp_path):
    out = tmp_path / "result.json"
    r = subprocess.run([str(LLM), "bench", "serve", "--url", server.url, "--model", PRIMARY, "--num-prompts", "8",
                        "--request-rate", "inf", "--max-concurrency", "4", "--input-len", "32", "--output-len", "16",
                        "--ignore-eos", "--api-key", server.api_key, "--result-json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Serving Benchmark Result" in r.stdout and "Mean TTFT (ms):" in r.stdout
    result = json.loads(out.read_text())
    assert (result["model"], result["max_concurrency"], result["request_rate"]) == (PRIMARY, 4, "inf")
    assert result["tokenizer"] == "server" and result["endpoint"] == "completions"
    check_result(result, 8, 32, 16)


def test_bench_serve_coroutine_on_chat(server, tmp_path):
    from launcher.bench.serve import ServeBenchConfig, benchmark
    # small on purpose: the CLI test above runs the full-size load; this one checks the importable path and chat
    config = ServeBenchConfig(url=server.base_url, model=None, endpoint="chat", num_prompts=3, input_len=16,
                              output_len=4, max_concurrency=3, ignore_eos=True, api_key=server.api_key,
                              percentiles=(50.0, 99.0), progress=False, result_json=str(tmp_path / "r.json"))
    result = asyncio.run(benchmark(config))
    assert result["model"] == PRIMARY              # the first id of GET /v1/models
    assert result["endpoint"] == "chat" and result["url"] == server.url
    assert result["p50_ttft_ms"] == result["median_ttft_ms"]
    check_result(result, 3, 16, 4, chat=True)
    assert json.loads((tmp_path / "r.json").read_text())["ttfts"] == result["ttfts"]


def test_list_json_url_shows_the_served_models(server):
    r = subprocess.run([str(LLM), "list", "--json", "--url", server.url, "--api-key", server.api_key], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    served = json.loads(r.stdout)["server"]
    with_key = {m["id"]: m for m in served["models"]}
    assert list(with_key) == [PRIMARY, "smol"]
    assert {m["max_model_len"] for m in with_key.values()} == {2048}
    assert {m["root"] for m in with_key.values()} == {server.model_path}
    r = subprocess.run([str(LLM), "list", "--json", "--url", server.url], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "401" in json.loads(r.stdout)["server"]["error"]   # the key is required
