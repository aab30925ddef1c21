#!/usr/bin/env python3
"""Host time per engine step with the model forward stubbed: what the CPU spends around each GPU step.

    .venv/bin/python scripts/bench_host.py [--device cpu|cuda] [--batches 1,64] [--json out.json]

A tiny random Llama-shaped model is built in-process; its forward returns fixed logits, so a step's time is
the scheduler, the runner's input preparation (graph buffers or eager metadata), the sampler and the outputs.
Each batch runs twice: from the decode-graph buffers (eagerly off CUDA) and on the eager path.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def make_checkpoint(root: Path) -> Path:
    import transformers as tf
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).save_pretrained(root / "tiny")
    return root / "tiny"


def _stub_forward(model, vocab: int, device: torch.device, max_rows: int, max_tokens: int) -> None:
    """The model returns a fixed [T, V] logits slice at once: no device work but the copies around it."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(max_rows, vocab, generator=gen).to(device)
    hidden = torch.zeros(max_tokens, 1, device=device)
    model.forward = lambda input_ids, positions, kv_caches, meta: hidden[: input_ids.shape[0]]
    model.compute_logits = lambda h: logits[: h.shape[0]]


def _timed(obj, name: str, totals: dict) -> None:
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
    setattr(obj, name, wrapper)


def measure(path: Path, device: str, batch: int, graphs: bool, prompt_len: int, steps: int,
            repeats: int = 10) -> dict:
    """ms per decode step of `batch` sequences (the fastest of `repeats` chunks), and where it went."""
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.messages import AddRequest
    from engine.sampling_params import SamplingParams
    config = EngineConfig(model=str(path), device=device, dtype="float32", max_model_len=4096, kv_cache_gib=0.25,
                          max_num_seqs=max(batch, 1), max_num_batched_tokens=max(2048, batch),
                          enable_prefix_caching=False, cuda_graphs=False, autotune=False, num_threads=None)
    core = EngineCore(config)
    if graphs:   # the decode-graph buffers and padding (replayed on CUDA would be one launch; run eagerly here)
        core.runner.use_decode_graphs(tuple(sorted({1, 2, 4, 8, batch})), core.max_model_len)
    _stub_forward(core.model, CONFIG["vocab_size"], core.device, max(batch, 8) + 8,
                  config.max_num_batched_tokens)
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps + 1000)
    for i in range(batch):
        prompt = torch.randint(3, CONFIG["vocab_size"], (prompt_len,), generator=gen).tolist()
        assert not core.add_request(AddRequest(f"r{i}", prompt, params, time.monotonic()))
    while core.scheduler.num_waiting or any(s.seq.num_output_tokens == 0 for s in core._samples.values()):
        core.step()
    for _ in range(5):
        core.step()
    totals: dict[str, float] = defaultdict(float)
    _timed(core.runner, "execute", totals)
    _timed(core.scheduler, "schedule", totals)
    _timed(core.scheduler, "update", totals)
    _timed(core, "sampler", totals)
    _timed(core, "_outputs", totals)
    best: tuple[float, dict] = (float("inf"), {})
    chunk = max(1, steps // repeats)
    for _ in range(repeats):   # the fastest chunk: the machine is shared, slow chunks are other work
        totals.clear()
        if core.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(chunk):
            assert len(core.step()) == batch
        seconds = time.perf_counter() - start
        if seconds < best[0]:
            best = (seconds, dict(totals))
    seconds, parts = best
    return {"batch": batch, "path": "graph buffers" if graphs else "eager", "ms_step": 1e3 * seconds / chunk,
            **{f"{k}_ms": 1e3 * v / chunk for k, v in sorted(parts.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_host_") as tmp:
        path = make_checkpoint(Path(tmp))
        for batch in (int(b) for b in args.batches.split(",")):
            for graphs in (True, False):
                row = measure(path, args.device, batch, graphs, args.prompt_len, args.steps)
                rows.append(row)
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
