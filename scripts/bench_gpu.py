#!/usr/bin/env python3
"""GPU figures in one run: copy bandwidth, decode/prefill speed, kernel GB/s, startup, parity with HF transformers.

On the GPU host (wheels staged here first with ../shared/gpu/stage, `.gpu-wheels` carried):

    source .gpu-wheels/activate && PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --json $OUT/bench_gpu.json

The JSON is rewritten after every phase (a run cut short keeps what it measured). `--quick` times fewer
steps and captures graphs up to batch 64 only, for the device check's time box (scripts/gpu_check);
`--layers N` builds the speed shapes with N decoder layers.

On the CPU, `--smoke` runs every code path on tiny float32 shapes (the test suite does this). Models are
randomly initialised by transformers (no weights can be downloaded there) and saved as HF directories.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5)
SHAPES = {   # name -> (family, HF config); the published configs' shapes
    "SmolLM2-135M": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "Qwen2.5-0.5B": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "Llama-3-8B": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "tiny-llama": ("llama", dict(TINY, tie_word_embeddings=False)),
    "tiny-qwen2": ("qwen2", dict(TINY, tie_word_embeddings=True)),
}


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run and how big: one for the GPU, a tiny one for --smoke on the CPU."""
    device: str
    dtype: str
    speed_shapes: tuple[str, ...]     # decode/prefill/startup/kernels/HF eager
    parity_shapes: tuple[str, ...]    # greedy tokens against HF transformers
    big_batch: int = 64
    prompt_len: int = 128
    decode_warmup: int = 10
    decode_steps: int = 100
    hf_steps: int = 50
    prefill_prompts: int = 16
    prefill_len: int = 1024
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float = 8.0
    copy_mib: int = 1024
    kernel_tokens: int = 8192
    attn_context: int = 4096
    prefill_attn_len: int = 4096
    num_parity_prompts: int = 32
    parity_tokens: int = 16
    layers: int | None = None         # decoder layers of the speed shapes (None: the published count)
    mode: str = "gpu"                 # gpu | quick | smoke

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


GPU_PLAN = Plan("cuda", "bfloat16", ("SmolLM2-135M", "Llama-3-8B"), ("SmolLM2-135M", "Qwen2.5-0.5B"))
# --quick: the figures the device check needs inside its time box (the Llama-3-8B shape in about 4 minutes):
# fewer timed steps and prompts, graphs up to batch 64 only (11 captures instead of 36)
QUICK_PLAN = replace(GPU_PLAN, decode_warmup=3, decode_steps=30, hf_steps=10, prefill_prompts=4, max_num_seqs=64,
                     max_num_batched_tokens=2048, num_parity_prompts=16, kernel_tokens=4096, mode="quick")
SMOKE_PLAN = Plan("cpu", "float32", ("tiny-llama",), ("tiny-llama", "tiny-qwen2"), big_batch=4, prompt_len=16,
                  decode_warmup=1, decode_steps=3, hf_steps=3, prefill_prompts=2, prefill_len=48, max_model_len=256,
                  max_num_seqs=8, max_num_batched_tokens=64, kv_cache_gib=0.05, copy_mib=16, kernel_tokens=64,
                  attn_context=64, prefill_attn_len=48, num_parity_prompts=8, parity_tokens=8, mode="smoke")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device: str) -> float:
    """Median milliseconds per call (device events via Triton on CUDA, a host clock on the CPU)."""
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_gbps(plan: Plan) -> float:
    """Device-to-device copy bandwidth, bytes read plus bytes written, on random bytes."""
    x = torch.randint(0, 256, (plan.copy_mib * 2**20,), dtype=torch.uint8, device=plan.device)
    y = torch.empty_like(x)
    return 2 * x.numel() / bench_ms(lambda: y.copy_(x), plan.device) / 1e6


def make_checkpoint(name: str, plan: Plan, root: Path, seed: int = 0):
    """A transformers model of the shape, randomly initialised in the plan's dtype on its device, and its
    saved HF directory."""
    import transformers as tf
    family, kwargs = SHAPES[name]
    config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                             "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
    if plan.layers and name in plan.speed_shapes:
        kwargs = dict(kwargs, num_hidden_layers=min(plan.layers, kwargs["num_hidden_layers"]))
    config = config_cls(**kwargs, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(plan.torch_dtype)   # built in the final dtype: no float32 copy of 8B weights
    try:
        with torch.device(plan.device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to(device=plan.device, dtype=plan.torch_dtype).eval()
    path = root / name
    model.save_pretrained(path)
    return model, path


@torch.inference_mode()
def hf_decode(model, plan: Plan, vocab: int) -> dict:
    """HF transformers eager, batch 1: greedy steps on its own KV cache, no host sync inside the loop."""
    ids = torch.randint(3, vocab, (1, plan.prompt_len), device=plan.device)
    out = model(input_ids=ids, use_cache=True)
    state = [out.past_key_values, out.logits[:, -1:].argmax(-1)]

    def step():
        o = model(input_ids=state[1], past_key_values=state[0], use_cache=True)
        state[0], state[1] = o.past_key_values, o.logits[:, -1:].argmax(-1)

    for _ in range(plan.decode_warmup):
        step()
    sync(plan.device)
    start = time.perf_counter()
    for _ in range(plan.hf_steps):
        step()
    sync(plan.device)
    seconds = time.perf_counter() - start
    return {"tok_s": plan.hf_steps / seconds, "ms_step": 1e3 * seconds / plan.hf_steps}


def engine_config(path: Path, plan: Plan, cache_dir: Path, autotune: bool = True):
    from engine.config import EngineConfig
    return EngineConfig(model=str(path), dtype=plan.dtype, device=plan.device, max_model_len=plan.max_model_len,
                        kv_cache_gib=plan.kv_cache_gib, max_num_seqs=plan.max_num_seqs,
                        max_num_batched_tokens=plan.max_num_batched_tokens, enable_prefix_caching=False,
                        autotune=autotune, autotune_cache_dir=str(cache_dir))


def start_engine(config) -> tuple[object, dict]:
    """EngineCore and its startup phases in seconds (load = everything but autotune and capture)."""
    from engine.core import EngineCore
    start = time.perf_counter()
    core = EngineCore(config)
    total = time.perf_counter() - start
    g = core.gpu_startup
    graphs = g.graphs if g is not None else None
    autotune_s = g.autotune_seconds if g is not None else 0.0
    capture_s = graphs.capture_seconds if graphs is not None else 0.0
    return core, {"total_s": total, "load_s": total - autotune_s - capture_s, "autotune_s": autotune_s,
                  "capture_s": capture_s, "num_graphs": len(graphs.batch_sizes) if graphs else 0,
                  "graph_mib": graphs.memory_bytes / 2**20 if graphs else 0.0,
                  "configs_tuned": g.num_configs_tuned if g else 0, "configs_loaded": g.num_configs_loaded if g else 0}


def prompts_for(count: int, length: int | tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (length, length) if isinstance(length, int) else length
    lens = torch.randint(lo, hi + 1, (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]


def submit(core, prompts: list[list[int]], params, tag: str) -> list[str]:
    from engine.messages import AddRequest
    ids = []
    for i, prompt in enumerate(prompts):
        rid = f"{tag}{i}"
        assert not core.add_request(AddRequest(rid, prompt, params, time.monotonic()))
        ids.append(rid)
    return ids


def engine_decode(core, batch: int, plan: Plan, vocab: int) -> dict:
    """Decode-only steps of `batch` sequences through EngineCore.step (graphs when the batch has a bucket)."""
    from engine.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=plan.decode_warmup + plan.decode_steps + 2)
    ids = submit(core, prompts_for(batch, plan.prompt_len, vocab, seed=batch), params, f"d{batch}-")
    started: set[str] = set()
    while len(started) < batch:   # prefill (chunked) until every sequence has its first token
        started.update(o.request_id for o in core.step())
    for _ in range(plan.decode_warmup):
        core.step()
    sync(plan.device)
    start = time.perf_counter()
    for _ in range(plan.decode_steps):
        assert len(core.step()) == batch
    seconds = time.perf_counter() - start   # each step ends in a host sync (the sampled ids)
    core.abort(ids)
    graphs = core.runner.graphs
    return {"batch": batch, "tok_s": batch * plan.decode_steps / seconds, "ms_step": 1e3 * seconds / plan.decode_steps,
            "graph": graphs is not None and batch <= graphs.batch_sizes[-1]}


def engine_prefill(core, plan: Plan, vocab: int) -> dict:
    from engine.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=1)
    for rnd, count in (("w", 2), ("p", plan.prefill_prompts)):   # a short warm-up round, then the timed one
        submit(core, prompts_for(count, plan.prefill_len, vocab, seed=ord(rnd)), params, f"{rnd}-")
        sync(plan.device)
        start = time.perf_counter()
        while core.has_work():
            core.step()
        seconds = time.perf_counter() - start
    tokens = plan.prefill_prompts * plan.prefill_len
    return {"tok_s": tokens / seconds, "tokens": tokens}


@torch.inference_mode()
def parity(core, hf_model, plan: Plan, vocab: int) -> dict:
    """Greedy tokens of our engine (all prompts batched) against HF generate (one prompt at a time)."""
    from engine.sampling_params import SamplingParams
    n, steps = plan.num_parity_prompts, plan.parity_tokens
    prompts = prompts_for(n, (8, 64), vocab, seed=1234)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps, logprobs=0)
    ids = submit(core, prompts, params, "c")
    ours = {rid: ([], []) for rid in ids}
    while core.has_work():
        for o in core.step():
            assert o.error is None, o.error
            ours[o.request_id][0].extend(o.new_token_ids)
            ours[o.request_id][1].extend(e.logprob for e in o.new_logprobs or [])
    same, lp_diff, ranks, gaps = 0, 0.0, [], []
    for rid, prompt in zip(ids, prompts):
        ids_t = torch.tensor([prompt], device=plan.device)
        ref = hf_model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=steps,
                                min_new_tokens=steps, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
        hf_tokens = ref.sequences[0, len(prompt):].tolist()
        logits = [x[0].float() for x in ref.logits]
        tokens, logprobs = ours[rid]
        lp_diff = max(lp_diff, abs(logprobs[0] - float(torch.log_softmax(logits[0], -1)[tokens[0]])))
        if tokens == hf_tokens:
            same += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b)   # same prefix up to i
        ranks.append(int((logits[i] > logits[i][tokens[i]]).sum()) + 1)
        gaps.append(float(logits[i][hf_tokens[i]] - logits[i][tokens[i]]))
    return {"prompts": n, "tokens": steps, "identical": same / n, "first_logprob_max_abs_diff": lp_diff,
            "mismatch_hf_ranks": ranks, "mismatch_logit_gaps": gaps}


def kernel_bench(name: str, plan: Plan, copy: float) -> list[dict]:
    """Each op at a memory-bound shape of this model (decode attention at big_batch x attn_context)."""
    from kernels import get_ops
    ops = get_ops(plan.device)
    _, c = SHAPES[name]
    dev, dt = plan.device, plan.torch_dtype
    e = torch.empty((), dtype=dt).element_size()
    t, hid, inter, nh, kvh = (plan.kernel_tokens, c["hidden_size"], c["intermediate_size"],
                              c["num_attention_heads"], c["num_key_value_heads"])
    d, bs, batch, ctx = hid // nh, 16, plan.big_batch, plan.attn_context
    rows = []

    def add(kernel: str, shape: str, fn, nbytes: float, flops: float = 0.0):
        ms = bench_ms(fn, dev)
        gbps = nbytes / ms / 1e6
        rows.append({"model": name, "kernel": kernel, "shape": shape, "ms": ms, "gbps": gbps,
                     "pct_copy": 100 * gbps / copy, "tflops": flops / ms / 1e9})

    r = lambda *shape, dtype=dt: torch.randn(*shape, dtype=dtype, device=dev)  # noqa: E731
    x, res, w = r(t, hid), r(t, hid), r(hid)
    add("rms_norm (+residual)", f"{t}x{hid}", lambda: ops.rms_norm(x, w, 1e-5, res), (4 * t + 1) * hid * e)
    q, k = r(t, nh, d), r(t, kvh, d)
    pos, cos_sin = torch.randint(0, ctx, (t,), device=dev), r(ctx, d, dtype=torch.float32)
    add("rotary", f"{t} tok {nh}+{kvh}h x{d}", lambda: ops.rotary_embedding(q, k, pos, cos_sin),
        2 * (q.numel() + k.numel()) * e + t * (d * 4 + 8))
    gate_up = r(t, 2 * inter)
    add("silu_and_mul", f"{t}x{2 * inter}", lambda: ops.silu_and_mul(gate_up), 3 * t * inter * e)
    num_blocks = batch * ctx // bs
    k_cache, v_cache = r(num_blocks, bs, kvh, d), r(num_blocks, bs, kvh, d)
    slots = torch.randperm(num_blocks * bs, device=dev)[:t]
    add("store_kv", f"{t} tok {kvh}h x{d}", lambda: ops.store_kv(k, k, k_cache, v_cache, slots),
        4 * t * kvh * d * e + t * 8)
    tables = torch.randperm(num_blocks, device=dev).view(batch, ctx // bs)
    lens, qd = torch.full((batch,), ctx, device=dev), r(batch, nh, d)
    add("paged_decode_attention", f"B{batch} ctx{ctx} {nh}/{kvh}h x{d}",
        lambda: ops.paged_decode_attention(qd, k_cache, v_cache, tables, lens, d ** -0.5, ctx),
        (2 * batch * ctx * kvh * d + 2 * batch * nh * d) * e + tables.numel() * 8)
    lp = plan.prefill_attn_len
    qp, cu = r(lp, nh, d), torch.tensor([0, lp], device=dev)
    ctx_p, table_p = torch.tensor([lp], device=dev), tables[:1, : -(-lp // bs)].contiguous()
    add("paged_prefill_attention", f"1x{lp} causal {nh}/{kvh}h x{d}",
        lambda: ops.paged_prefill_attention(qp, k_cache, v_cache, cu, ctx_p, table_p, d ** -0.5, lp, lp),
        (2 * lp * nh * d + 2 * lp * kvh * d) * e, flops=4 * nh * d * lp * lp / 2)
    vocab = c["vocab_size"]
    logits, expo = r(batch, vocab, dtype=torch.float32), torch.empty(batch, vocab, device=dev).exponential_()
    temp, top_p = torch.full((batch,), 0.8, device=dev), torch.full((batch,), 0.9, device=dev)
    top_k = torch.full((batch,), 50, device=dev, dtype=torch.int64)
    add("sample_top_k_top_p", f"{batch}x{vocab} f32", lambda: ops.sample_top_k_top_p(logits, temp, top_k, top_p, expo),
        2 * batch * vocab * 4)
    return rows


def startup_in_child(path: Path, plan: Plan, cache_dir: Path) -> dict:
    """A fresh process starting the engine with a warm autotune cache: process_s includes imports and CUDA init."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--startup-child", str(path), "--cache-dir", str(cache_dir)]
    cmd += {"smoke": ["--smoke"], "quick": ["--quick"]}.get(plan.mode, [])   # the same engine settings
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"startup child failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(figures, process_s=time.perf_counter() - start)


def run_model(name: str, plan: Plan, root: Path, copy: float, entry: dict,
              save=lambda phase: None, warm_start: bool = True) -> dict:
    """Every phase of one model shape; `entry` is filled in place and save(phase) called after each phase,
    so a run cut short still leaves the figures it got."""
    vocab = SHAPES[name][1]["vocab_size"]
    start = time.perf_counter()
    hf_model, path = make_checkpoint(name, plan, root)
    entry["checkpoint_s"] = time.perf_counter() - start
    save("checkpoint")
    is_speed, is_parity = name in plan.speed_shapes, name in plan.parity_shapes
    if is_speed:
        entry["hf_decode_b1"] = hf_decode(hf_model, plan, vocab)
        save("hf_decode_b1")
    if not is_parity:
        del hf_model   # the 8B shape: free its 16 GB before our engine loads
        hf_model = None
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    cache_dir = root / "autotune"
    # parity-only shapes start with heuristic configs: it is the kernels' results that are checked, not speed
    core, entry["startup_cold"] = start_engine(engine_config(path, plan, cache_dir, autotune=is_speed))
    save("startup_cold")
    if is_speed:
        entry["decode"] = []
        for batch in (1, plan.big_batch):
            entry["decode"].append(engine_decode(core, batch, plan, vocab))
            save(f"decode_b{batch}")
        entry["prefill"] = engine_prefill(core, plan, vocab)
        save("prefill")
        entry["kernels"] = kernel_bench(name, plan, copy)
        save("kernels")
    if is_parity:
        entry["parity"] = parity(core, hf_model, plan, vocab)
        save("parity")
    del core, hf_model
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    if is_speed and warm_start:
        entry["startup_warm"] = startup_in_child(path, plan, cache_dir)
        save("startup_warm")
    return entry


def table(report: dict) -> str:
    models = report["models"]
    lines = [f"device: {report['device']}; copy bandwidth {report['copy_gbps']:.0f} GB/s; dtype {report['dtype']}", "",
             "| model | b1 decode tok/s | b1 ms/step | b{0} decode tok/s | b{0} ms/step | prefill tok/s | "
             "HF eager b1 tok/s |".format(report["big_batch"]), "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        if "decode" in m:
            d1, db = m["decode"]
            lines.append(f"| {name} | {d1['tok_s']:.0f} | {d1['ms_step']:.2f} | {db['tok_s']:.0f} | "
                         f"{db['ms_step']:.2f} | {m['prefill']['tok_s']:.0f} | {m['hf_decode_b1']['tok_s']:.0f} |")
    lines += ["", "| model | load s | autotune cold s | graphs (n, MiB, s) | warm start: engine s / process s "
              "(autotune s) |", "|---|---|---|---|---|"]
    for name, m in models.items():
        if "startup_warm" in m:
            c, w = m["startup_cold"], m["startup_warm"]
            lines.append(f"| {name} | {c['load_s']:.1f} | {c['autotune_s']:.1f} ({c['configs_tuned']} tuned) | "
                         f"{c['num_graphs']}, {c['graph_mib']:.0f}, {c['capture_s']:.2f} | {w['total_s']:.1f} / "
                         f"{w['process_s']:.1f} ({w['autotune_s']:.1f}) |")
    lines += ["", "| model | kernel | shape | ms | GB/s | % of copy | TFLOP/s |", "|---|---|---|---|---|---|---|"]
    for m in models.values():
        for k in m.get("kernels", []):
            lines.append(f"| {k['model']} | {k['kernel']} | {k['shape']} | {k['ms']:.4f} | {k['gbps']:.0f} | "
                         f"{k['pct_copy']:.0f}% | {k['tflops']:.1f} |")
    lines += ["", "| model | identical first {} tokens | first-token logprob max abs diff | mismatches: HF rank of "
              "our token |".format(report["parity_tokens"]), "|---|---|---|---|"]
    for name, m in models.items():
        if "parity" in m:
            p = m["parity"]
            lines.append(f"| {name} | {p['identical']:.0%} of {p['prompts']} | {p['first_logprob_max_abs_diff']:.4f} "
                         f"| {p['mismatch_hf_ranks']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny float32 shapes on the CPU")
    ap.add_argument("--json", type=Path, help="write the figures here (rewritten after every phase)")
    ap.add_argument("--models", help="comma-separated subset of the plan's models")
    ap.add_argument("--quick", action="store_true",
                    help="fewer timed steps and prompts, graphs up to batch 64 (the device check's time box)")
    ap.add_argument("--layers", type=int, help="decoder layers of the speed shapes (default: the real count)")
    ap.add_argument("--no-warm-start", action="store_true", help="skip the warm-start child process")
    ap.add_argument("--parity-only", action="store_true", help="only the greedy-parity shapes, no speed figures")
    ap.add_argument("--startup-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    plan = SMOKE_PLAN if args.smoke else QUICK_PLAN if args.quick else GPU_PLAN
    if args.layers:
        plan = replace(plan, layers=args.layers)
    if args.smoke:
        torch.set_num_threads(1)   # tiny shapes: more threads only contend (and CI cores are shared)
    if args.startup_child:
        core, figures = start_engine(engine_config(args.startup_child, plan, args.cache_dir))
        del core
        print(json.dumps(figures))
        return
    if plan.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU code paths")
    if args.parity_only:
        plan = replace(plan, speed_shapes=())
    if args.models:
        keep = set(args.models.split(","))
        plan = replace(plan, speed_shapes=tuple(s for s in plan.speed_shapes if s in keep),
                       parity_shapes=tuple(s for s in plan.parity_shapes if s in keep))
    device_name = torch.cuda.get_device_name() if plan.device == "cuda" else "cpu"
    report = {"device": device_name, "torch": torch.__version__, "plan": asdict(plan), "dtype": plan.dtype,
              "big_batch": plan.big_batch, "parity_tokens": plan.parity_tokens, "models": {}}
    start = time.perf_counter()

    def save(phase: str) -> None:
        report["seconds"] = time.perf_counter() - start
        report["last_phase"] = phase
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(args.json)   # a reader (or a kill) never sees half a file
        print(f"[{report['seconds']:.0f}s] {phase}", file=sys.stderr, flush=True)

    report["copy_gbps"] = copy_gbps(plan)
    save("copy_gbps")
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        for name in dict.fromkeys(plan.speed_shapes + plan.parity_shapes):
            entry = report["models"][name] = {}
            run_model(name, plan, Path(tmp), report["copy_gbps"], entry,
                      save=lambda phase, name=name: save(f"{name} {phase}"), warm_start=not args.no_warm_start)
    report["done"] = True
    save("done")
    print(table(report))


if __name__ == "__main__":
    main()
