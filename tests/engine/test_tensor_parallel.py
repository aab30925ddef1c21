"""Tensor parallel on the CPU with gloo: TP=2 against TP=1 through the engine (greedy tokens, logits and
logprobs), weight shards against the full weights, and a killed worker failing the waiting requests."""
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.core import EngineCore
from engine.loader import ModelFiles, load_config, load_model
from engine.messages import AddRequest, EngineFatal, EngineInfo, StepOutputs
from engine.model_runner import ModelRunner
from engine.models.parallel import TensorParallel, shard_quantized, valid_sizes
from engine.sampling_params import SamplingParams
from engine.startup import StartupError
from kernels import cpu_build
from kernels.cpu_quant import QuantizedTensor, unpack
from tests.engine.helpers import TINY

BLOCK_SIZE = 8
NUM_BLOCKS = 20   # fewer than the scenario's sequences need at once: the scheduler preempts


@pytest.fixture(autouse=True)
def _keep_threads():
    """EngineCore sets torch's thread count for its process (here: pytest's); give it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _save(tmp_path_factory, name: str, num_kv_heads: int) -> Path:
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**TINY, "num_key_value_heads": num_kv_heads}, tie_word_embeddings=False)
    cfg.eos_token_id, cfg.bos_token_id = 2, 1
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)   # well-separated greedy choices (random init is near uniform)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> Path:
    return _save(tmp_path_factory, "gqa", 2)     # 4 heads, 2 KV heads: one KV head per rank


@pytest.fixture(scope="module")
def mqa(tmp_path_factory) -> Path:
    return _save(tmp_path_factory, "mqa", 1)     # 4 heads, 1 KV head: replicated on both ranks


def _config(path: Path, tp: int, cpu_kernels: bool) -> EngineConfig:
    """The same number of KV blocks whatever the TP size (a rank's blocks hold only its KV heads), so both
    runs schedule alike: same chunks, same prefix hits, same preemptions."""
    model_config = load_config(ModelFiles.at(path))
    per_block = ModelRunner.kv_bytes_per_block(model_config, BLOCK_SIZE, torch.float32, TensorParallel(0, tp))
    return EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=BLOCK_SIZE,
                        kv_cache_gib=(NUM_BLOCKS + 0.5) * per_block / 2**30, max_model_len=NUM_BLOCKS * BLOCK_SIZE,
                        max_num_seqs=8, max_num_batched_tokens=32, num_threads=1, cpu_kernels=cpu_kernels,
                        tensor_parallel_size=tp)


def _run(config: EngineConfig) -> dict:
    """Mixed prompt lengths in chunks of 32 tokens with preemption, then prompts sharing a prefix with the
    first wave (prefix-cache hits); returns tokens, logprobs, each step's logits and the scheduler's counters."""
    core = EngineCore(config)
    try:
        assert core.runner.num_blocks == NUM_BLOCKS
        step_logits: list[torch.Tensor] = []
        execute = core.runner.execute

        def recording(batch):
            out = execute(batch)
            step_logits.append(out.logits.clone())
            return out

        core.runner.execute = recording
        gen = torch.Generator().manual_seed(7)
        first = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 33, 70)]
        second = [first[3][:40] + [9, 10, 11], first[2][:24] + [12]]
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list] = {}
        cached: dict[str, int] = {}
        for wave, prompts in (("a", first), ("b", second)):
            for i, prompt in enumerate(prompts):
                assert not core.add_request(AddRequest(f"{wave}{i}", prompt, params, time.monotonic()))
            while core.has_work():
                for out in core.step():
                    assert out.error is None, out.error
                    tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                    logprobs.setdefault(out.request_id, []).extend(out.new_logprobs or [])
                    cached[out.request_id] = out.num_cached_tokens
        stats = core.stats().scheduler
        return dict(tokens=tokens, logprobs=logprobs, cached=cached, logits=step_logits,
                    preemptions=stats.num_preemptions, hits=stats.prefix_cache_hits)
    finally:
        core.close()


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["c-kernels", "torch-ops"])
@pytest.mark.parametrize("checkpoint", ["gqa", "mqa"])
def test_tp2_matches_tp1(checkpoint, cpu_kernels, request):
    if cpu_kernels and cpu_build.load_library() is None:
        pytest.skip("C kernels not built here")
    path = request.getfixturevalue(checkpoint)
    one, two = _run(_config(path, 1, cpu_kernels)), _run(_config(path, 2, cpu_kernels))
    assert one["preemptions"] > 0 and one["hits"] > 0 and min(one["cached"][r] for r in ("b0", "b1")) > 0
    assert (two["preemptions"], two["hits"], two["cached"]) == (one["preemptions"], one["hits"], one["cached"])
    assert two["tokens"] == one["tokens"]
    assert all(len(t) == 24 for t in one["tokens"].values())
    assert len(two["logits"]) == len(one["logits"])
    for a, b in zip(one["logits"], two["logits"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    for rid, entries in one["logprobs"].items():
        for a, b in zip(entries, two["logprobs"][rid]):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def _full_and_shards(path: Path, size: int):
    files = ModelFiles.at(path)
    config = load_config(files)

    def load(tp):
        return load_model(files, config, torch.float32, torch.device("cpu"), max_positions=64, tp=tp)

    return config, load(None), [load(TensorParallel(r, size)) for r in range(size)]


@pytest.mark.parametrize("checkpoint", ["gqa", "mqa"])
def test_shards_concatenate_to_the_full_weights(checkpoint, request):
    config, full, shards = _full_and_shards(request.getfixturevalue(checkpoint), 2)
    d = config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    for i, layer in enumerate(full.layers):
        ranks = [s.layers[i] for s in shards]
        local_q = q // 2
        local_kv = max(kv // 2, d)
        parts = [r.self_attn.qkv_proj.weight.split([local_q, local_kv, local_kv]) for r in ranks]
        want_q, want_k, want_v = layer.self_attn.qkv_proj.weight.split([q, kv, kv])
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), want_q, rtol=0, atol=0)
        if config.num_key_value_heads >= 2:
            torch.testing.assert_close(torch.cat([p[1] for p in parts]), want_k, rtol=0, atol=0)
            torch.testing.assert_close(torch.cat([p[2] for p in parts]), want_v, rtol=0, atol=0)
        else:   # one KV head, held whole by every rank
            for p in parts:
                torch.testing.assert_close(p[1], want_k, rtol=0, atol=0)
                torch.testing.assert_close(p[2], want_v, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([r.self_attn.o_proj.weight for r in ranks], dim=1),
                                   layer.self_attn.o_proj.weight, rtol=0, atol=0)
        n = config.intermediate_size
        gate_up = [r.mlp.gate_up_proj.weight.split([n // 2, n // 2]) for r in ranks]
        want_gate, want_up = layer.mlp.gate_up_proj.weight.split([n, n])
        torch.testing.assert_close(torch.cat([g for g, _ in gate_up]), want_gate, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([u for _, u in gate_up]), want_up, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([r.mlp.down_proj.weight for r in ranks], dim=1),
                                   layer.mlp.down_proj.weight, rtol=0, atol=0)
        for r in ranks:   # norms replicated
            torch.testing.assert_close(r.input_layernorm.weight, layer.input_layernorm.weight, rtol=0, atol=0)
    for s in shards:      # embeddings and LM head replicated
        torch.testing.assert_close(s.embed_tokens.weight, full.embed_tokens.weight, rtol=0, atol=0)
        torch.testing.assert_close(s.lm_head.weight, full.lm_head.weight, rtol=0, atol=0)


def test_quantized_shards_dequantize_to_the_slices():
    config = ModelConfig.from_hf_dict({**TINY, "architectures": ["LlamaForCausalLM"]}, "tiny")   # 4 / 2 heads
    gen = torch.Generator().manual_seed(0)

    def random_q(rows: int, cols: int, bits: int, group: int) -> QuantizedTensor:
        q = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8) if bits == 4 else \
            torch.randint(-128, 128, (rows, cols), generator=gen, dtype=torch.int8)
        g = cols // group
        return QuantizedTensor(q, torch.rand(rows, g, generator=gen), torch.randn(rows, g, generator=gen)
                               if bits == 4 else None, bits, group)

    h, d = config.hidden_size, config.head_dim
    for rank in (0, 1):
        tp = TensorParallel(rank, 2)
        w = random_q(config.num_attention_heads * d, h, 4, 32)     # q_proj: whole rows per rank
        got = shard_quantized("model.layers.0.self_attn.q_proj.weight", w, config, tp)
        rows = config.num_attention_heads * d // 2
        torch.testing.assert_close(got.dequantize(), w.dequantize()[rank * rows:(rank + 1) * rows], rtol=0, atol=0)
        w = random_q(h, 4 * 32, 8, 32)                             # down_proj, 128 inputs: 2 groups per rank
        shard_config = _replace(config, intermediate_size=128)
        got = shard_quantized("model.layers.0.mlp.down_proj.weight", w, shard_config, tp)
        torch.testing.assert_close(got.dequantize(), w.dequantize()[:, rank * 64:(rank + 1) * 64], rtol=0, atol=0)
        w = random_q(h, 3 * 32, 8, 32)                             # 96 inputs: 48 a rank cuts a group
        assert shard_quantized("model.layers.0.mlp.down_proj.weight", w,
                               _replace(config, intermediate_size=96), tp) is None


@pytest.mark.skipif(cpu_build.load_library() is None, reason="quantized CPU kernel not built here")
def test_gguf_packed_shards_are_the_float_shards(tmp_path):
    from gguf.constants import GGMLQuantizationType as QT

    from tests.engine.test_gguf import write_tiny
    # ffn 352: gate/up rows split anywhere, but down_proj's 176 inputs a rank are not whole groups of 32
    path = write_tiny(tmp_path / "m.gguf", "llama", matrix_qtypes=[QT.Q4_1], heads=2, kv_heads=1, ffn=352)
    files = ModelFiles.at(str(path))
    config = load_config(files)
    full = load_model(files, config, torch.float32, torch.device("cpu"), max_positions=64, cpu_kernels=True)
    for rank in (0, 1):
        shard = load_model(files, config, torch.float32, torch.device("cpu"), max_positions=64, cpu_kernels=True,
                           tp=TensorParallel(rank, 2))
        layer = shard.layers[0]
        for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj):
            assert module.packed is not None
            torch.testing.assert_close(unpack(module.packed).dequantize(), module.weight, rtol=1e-6, atol=1e-7)
        assert getattr(layer.mlp.down_proj, "packed", None) is None   # would cut a group: kept float32
        torch.testing.assert_close(layer.mlp.down_proj.weight,
                                   full.layers[0].mlp.down_proj.weight[:, rank * 176:(rank + 1) * 176])


def test_a_size_that_does_not_split_the_heads_is_one_line(gqa):
    assert valid_sizes(load_config(ModelFiles.at(gqa))) == [1, 2, 4]
    with pytest.raises(StartupError) as err:
        EngineCore(_config(gqa, 3, cpu_kernels=False))
    message = str(err.value)
    assert "\n" not in message and "tensor_parallel_size=3" in message and "sizes that work: 1, 2, 4" in message


def test_a_worker_that_dies_before_joining_fails_the_start_at_once(gqa, monkeypatch):
    import engine.tp_worker as tp_worker
    monkeypatch.setattr(tp_worker, "worker_command", lambda fd: [sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(StartupError, match="worker 1 .* exited with code 3 before joining"):
        EngineCore(_config(gqa, 2, cpu_kernels=False))
    assert time.monotonic() - started < 20


def test_a_killed_worker_fails_the_waiting_requests(gqa):
    from engine.engine_process import EngineProcess
    config = _config(gqa, 2, cpu_kernels=True)
    engine = EngineProcess(config)
    engine.start()
    try:
        while not isinstance(msg := engine.recv(timeout=60), EngineInfo):
            assert msg is not None and not isinstance(msg, EngineFatal), msg
        [worker] = _children(engine.pid)
        params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
        for i in range(3):
            engine.send(AddRequest(f"r{i}", [5, 6, 7, 8 + i], params, time.monotonic()))
        while not isinstance(msg := engine.recv(timeout=30), StepOutputs) or not msg.outputs:
            assert msg is not None
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        errors, fatal = {}, None
        while fatal is None:
            msg = engine.recv(timeout=10)
            assert msg is not None, "the engine hung after its worker died"
            if isinstance(msg, StepOutputs):
                errors.update({o.request_id: o.error for o in msg.outputs if o.finish_reason == "error"})
            fatal = msg if isinstance(msg, EngineFatal) else None
        assert time.monotonic() - killed < 5
        assert set(errors) == {"r0", "r1", "r2"} and all("worker 1" in e for e in errors.values()), errors
        assert "worker 1" in fatal.message
        engine.process.wait(10)   # the engine exits
    finally:
        engine.shutdown()


def test_the_engine_process_stops_its_workers(gqa):
    from engine.engine_process import EngineProcess
    engine = EngineProcess(_config(gqa, 2, cpu_kernels=False))
    engine.start()
    try:
        while not isinstance(msg := engine.recv(timeout=60), EngineInfo):
            assert msg is not None and not isinstance(msg, EngineFatal), msg
        [worker] = _children(engine.pid)
        engine.send(AddRequest("r", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4), time.monotonic()))
        tokens: list[int] = []
        while len(tokens) < 4:
            msg = engine.recv(timeout=30)
            assert msg is not None
            if isinstance(msg, StepOutputs):
                tokens += [t for o in msg.outputs for t in o.new_token_ids]
    finally:
        engine.shutdown()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists(), "the worker outlived the engine"


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _replace(config: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(config, **changes)

