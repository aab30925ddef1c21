#!/usr/bin/env python3
"""Probe issue 16's GPU defects in one process: memory after load, decode-kernel variants, host time per step.

    python3 scripts/gpu_probe.py --json $OUT/probe.json           # on the GPU (random SmolLM2-135M shape)
    python3 scripts/gpu_probe.py --smoke --json /tmp/probe.json    # tiny shapes on the CPU

1. load: device memory allocated / reserved / peak right after load_model, against the weights' own bytes
   (a float32 copy made before the cast shows as a peak of ~3x the bfloat16 weights).
2. decode variants: Triton decode-kernel specialisations compiled before and after a mixed eager run
   (prompts of many lengths beside decodes), and the block-table widths the decode wrapper was given.
3. host: ms per engine step with the model forward stubbed, at batch 1 and 64 (scripts/bench_host.py).
The JSON is rewritten after each part.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def _mib(n: int) -> float:
    return round(n / 2**20, 2)


def probe_load(path: Path, device: torch.device, dtype: torch.dtype) -> dict:
    from engine.loader import ModelFiles, load_config, load_model
    files = ModelFiles.at(path)
    config = load_config(files)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    model = load_model(files, config, dtype, device, max_positions=2048)
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"seconds": round(seconds, 3), "weights_mib": _mib(weights),
           "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})}
    if cuda:
        allocated = torch.cuda.memory_allocated(device) - base
        peak = torch.cuda.max_memory_allocated(device) - base
        out.update(allocated_mib=_mib(allocated), reserved_mib=_mib(torch.cuda.memory_reserved(device)),
                   peak_mib=_mib(peak), peak_over_weights=round(peak / max(weights, 1), 3))
        torch.cuda.empty_cache()
        out["reserved_after_empty_cache_mib"] = _mib(torch.cuda.memory_reserved(device))
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


def _variants(kernel, device: torch.device) -> int | None:
    """How many specialisations of a @triton.jit kernel are compiled for this device (None: unknown here)."""
    if device.type != "cuda":
        return None
    caches = getattr(kernel, "device_caches", None)   # Triton >= 3.2: device -> (kernel cache, ...)
    if caches is not None:
        return sum(len(c[0]) for c in caches.values())
    cache = getattr(kernel, "cache", None)
    return sum(len(c) for c in cache.values()) if isinstance(cache, dict) else None


def probe_decode_variants(path: Path, device: torch.device, dtype: str) -> dict:
    from engine.attention import PagedAttention
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.messages import AddRequest
    from engine.sampling_params import SamplingParams
    core = EngineCore(EngineConfig(model=str(path), device=device.type, dtype=dtype, max_model_len=1024,
                                   kv_cache_gib=0.25, max_num_seqs=16, max_num_batched_tokens=128, cuda_graphs=False,
                                   autotune=False, enable_prefix_caching=False))
    widths: set[int] = set()
    for module in core.model.modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, PagedAttention):
            ops = attn.ops

            def decode(q, k_cache, v_cache, block_tables, *args, ops=ops):
                widths.add(int(block_tables.shape[1]))
                return ops.paged_decode_attention(q, k_cache, v_cache, block_tables, *args)
            attn.ops = SimpleNamespace(store_kv=ops.store_kv, paged_prefill_attention=ops.paged_prefill_attention,
                                       paged_decode_attention=decode)
    kernels = {}
    if device.type == "cuda":
        from kernels import decode_attention
        kernels = {"stage1": decode_attention._decode_stage1_kernel, "stage2": decode_attention._decode_stage2_kernel}
    before = {name: _variants(k, device) for name, k in kernels.items()}
    gen = torch.Generator().manual_seed(16)
    lengths = (3, 90, 17, 300, 40, 9, 600, 150)
    for i, n in enumerate(lengths):
        prompt = torch.randint(3, core.model_config.vocab_size, (n,), generator=gen).tolist()
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8 + 4 * i)
        assert not core.add_request(AddRequest(f"m{i}", prompt, params, time.monotonic()))
    steps, start = 0, time.perf_counter()
    while core.has_work():
        core.step()
        steps += 1
    after = {name: _variants(k, device) for name, k in kernels.items()}
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 3), "decode_table_widths": sorted(widths),
            "variants_before": before, "variants_after": after}


def probe_host(path: Path, device: str, smoke: bool) -> list[dict]:
    from bench_host import measure
    steps = 20 if smoke else 200
    return [measure(path, device, batch, graphs, prompt_len=64 if smoke else 512, steps=steps,
                    repeats=2 if smoke else 10)
            for batch in (1, 64) for graphs in (True, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    from bench_gpu import QUICK_PLAN, SMOKE_PLAN, make_checkpoint
    plan = SMOKE_PLAN if args.smoke else QUICK_PLAN
    if plan.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on the CPU")
    if args.smoke:
        torch.set_num_threads(1)
    device = torch.device(plan.device)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": plan.dtype}

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))

    with tempfile.TemporaryDirectory(prefix="gpu_probe_") as tmp:
        shape = "tiny-llama" if args.smoke else "SmolLM2-135M"
        hf_model, path = make_checkpoint(shape, plan, Path(tmp))
        del hf_model
        report["shape"] = shape
        report["load"] = probe_load(path, device, plan.torch_dtype)
        save()
        report["decode_variants"] = probe_decode_variants(path, device, plan.dtype)
        save()
        report["host_ms_per_step"] = _host(Path(tmp), plan.device, args.smoke)
        save()
    report["ok"] = True
    save()
    print(json.dumps(report, indent=1))


def _host(root: Path, device: str, smoke: bool) -> list[dict]:
    from bench_host import make_checkpoint as tiny_checkpoint
    return probe_host(tiny_checkpoint(root), device, smoke)


if __name__ == "__main__":
    main()
