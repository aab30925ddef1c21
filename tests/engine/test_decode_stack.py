"""The one-call decoder stack (kernels/cpu_layers.c) against the per-layer Python loop: bit-identical hidden
states at every step, decode batches of 1 and 5 crossing KV block boundaries, both packed layouts."""
from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType as QT

from engine.core import EngineCore
from engine.sampling_params import SamplingParams
from kernels import cpu_build, cpu_ops
from tests.engine.helpers import engine_config, run_to_completion
from tests.engine.test_gguf import write_tiny

pytestmark = pytest.mark.skipif(cpu_build.load_library() is None, reason="the CPU kernels are not built here")

# (prompt length, new tokens) per request; block size 16: contexts cross 16, 32 and 48, and the batch of
# five shrinks as its requests finish
BATCH_1 = [(13, 8)]
BATCH_5 = [(1, 6), (14, 8), (16, 5), (30, 7), (47, 9)]
TINY = {   # write_tiny's arguments
    "llama-q4_1-q8_0": dict(arch="llama", tied=False, matrix_qtypes=[QT.Q4_1, QT.Q8_0]),
    "qwen2-bias": dict(arch="qwen2", bias=True, matrix_qtypes=[QT.Q8_0, QT.Q4_0]),
    "qwen3-qk-norm": dict(arch="qwen3", qk_norm=True, matrix_qtypes=[QT.Q4_1]),
    "llama-mixed": dict(arch="llama", matrix_qtypes=[QT.Q4_0, QT.Q8_0, QT.Q5_0, QT.Q4_1, QT.Q5_1]),
}


class Recorder:
    """Each forward's final hidden states, and whether its batch was decode-only."""

    def __init__(self, core: EngineCore):
        self.hidden: list[torch.Tensor] = []
        self.is_decode: list[bool] = []
        core.model.register_forward_hook(self._hook)

    def _hook(self, module, args, out) -> None:
        input_ids, meta = args[0], args[3]
        self.hidden.append(out.clone())
        self.is_decode.append(meta.num_decode_tokens == input_ids.shape[0])


@pytest.fixture
def count_calls(monkeypatch) -> list[int]:
    calls = [0]
    call = cpu_ops.DecodeStack.__call__

    def counted(self, *args):
        calls[0] += 1
        return call(self, *args)
    monkeypatch.setattr(cpu_ops.DecodeStack, "__call__", counted)
    return calls


def assert_same_steps(path: str, vocab: int, count_calls: list[int], **config) -> None:
    cores = {fused: EngineCore(engine_config(path, **config)) for fused in (True, False)}
    cores[False].model.fused_decode = False
    gen = torch.Generator().manual_seed(0)
    for requests in (BATCH_1, BATCH_5):
        prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n, _ in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in requests]
        recorders, outputs = {}, {}
        for fused, core in cores.items():
            count_calls[0] = 0
            recorders[fused] = Recorder(core)
            outputs[fused] = run_to_completion(core, prompts, params)
            # the fused path runs every decode-only step and nothing else
            num_decode = sum(recorders[fused].is_decode)
            assert count_calls[0] == (num_decode if fused else 0)
            assert num_decode >= max(m for _, m in requests) - 1
            core.model._forward_hooks.clear()
        assert outputs[True] == outputs[False]
        on, off = recorders[True].hidden, recorders[False].hidden
        assert len(on) == len(off)
        for step, (a, b) in enumerate(zip(on, off)):
            assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max()}"


@pytest.mark.parametrize("quantized_activations", [False, True], ids=["float32-acts", "int8-acts"])
def test_default_model(default_gguf_path, count_calls, quantized_activations) -> None:
    assert_same_steps(default_gguf_path, 49152, count_calls, kv_cache_gib=0.05,
                      cpu_quantized_activations=quantized_activations)


@pytest.mark.parametrize("quantized_activations", [False, True], ids=["float32-acts", "int8-acts"])
@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_gguf(tmp_path: Path, count_calls, kind: str, quantized_activations: bool) -> None:
    args = dict(TINY[kind])
    path = write_tiny(tmp_path / "m.gguf", args.pop("arch"), **args)
    assert_same_steps(str(path), 96, count_calls, cpu_quantized_activations=quantized_activations)


def test_unpacked_layers_take_the_loop(tmp_path: Path, count_calls) -> None:
    """An F16 shard leaves a projection float32: the stack cannot run it, decode stays on the loop."""
    path = write_tiny(tmp_path / "m.gguf", "llama", matrix_qtypes=[QT.Q4_1, QT.Q8_0, QT.F16])
    core = EngineCore(engine_config(str(path)))
    run_to_completion(core, [[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert count_calls[0] == 0 and core.model._decode_stack is False
