"""GGUF 4/8-bit weights packed for the CPU kernel: the same matrices as the float32 weights, fused alike."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType as QT

from engine.loader import ModelFiles, load_config, load_model
from kernels import cpu_build, cpu_quant
from tests.engine.test_gguf import write_tiny

pytestmark = pytest.mark.skipif(cpu_build.load_library() is None, reason="quantized CPU kernel not built here")
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def load(path: Path, quantized: bool) -> torch.nn.Module:
    files = ModelFiles.at(str(path))
    return load_model(files, load_config(files), torch.float32, torch.device("cpu"), max_positions=64,
                      cpu_kernels=quantized)


@pytest.mark.parametrize("arch,qtypes", [("llama", [QT.Q4_0]), ("llama", [QT.Q4_1]), ("qwen2", [QT.Q8_0]),
                                         ("llama", [QT.Q5_0]), ("qwen2", [QT.Q5_1]),
                                         ("llama", [QT.Q4_1, QT.Q8_0]), ("llama", [QT.Q4_1, QT.Q8_0, QT.F16])],
                         ids=["llama-q4_0", "llama-q4_1", "qwen2-q8_0", "llama-q5_0", "qwen2-q5_1", "llama-q4-q8",
                              "llama-with-f16"])
def test_packed_weights_equal_float_weights(tmp_path: Path, arch: str, qtypes: list[QT]) -> None:
    path = write_tiny(tmp_path / "m.gguf", arch, bias=arch == "qwen2", matrix_qtypes=qtypes)
    model = load(path, quantized=True)
    x = torch.randn(3, 512)
    num_packed = 0
    for name, module in model.named_modules():
        packed = getattr(module, "packed", None)
        if name.rsplit(".", 1)[-1] in PROJECTIONS + ("embed_tokens",) and len(qtypes) == 1:
            assert packed is not None, f"{name} was not packed"
        if packed is None:
            continue
        num_packed += 1
        # the packed integers read back are the float32 weight (Q4_0's d*q - 8d rounds like (q - 8) * d)
        torch.testing.assert_close(cpu_quant.unpack(packed).dequantize(), module.weight, rtol=1e-6, atol=1e-7)
        k = module.weight.shape[1]
        torch.testing.assert_close(cpu_quant.quant_matmul(x[:, :k], packed), F.linear(x[:, :k], module.weight),
                                   rtol=1e-4, atol=1e-4)
    assert num_packed > 0
    qkv = getattr(model.layers[0].self_attn.qkv_proj, "packed", None)
    if QT.F16 in qtypes:    # q: Q8_0, k: F16, v: Q4_1 -- a shard the kernel cannot read: the fused weight stays float32
        assert qkv is None
    elif len(qtypes) > 1:   # q: Q8_0, k: Q4_1, v: Q8_0 -- widened to one 8-bit weight
        assert qkv is not None and qkv.bits == 8


def test_logits_agree_with_float_weights(tmp_path: Path) -> None:
    path = write_tiny(tmp_path / "m.gguf", "llama", matrix_qtypes=[QT.Q4_1])
    quant, dense = load(path, quantized=True), load(path, quantized=False)
    hidden = torch.randn(4, 256)
    torch.testing.assert_close(quant.compute_logits(hidden), dense.compute_logits(hidden), rtol=1e-4, atol=1e-4)
    assert not hasattr(dense.embed_tokens, "packed")


def test_packed_only_layers_match_float_weights(tmp_path: Path) -> None:
    """Without float32 copies (a GGUF too big for memory as float32) every batch size runs packed, prefill
    chunks included, and the checkpoint's packed tensors are never dequantized."""
    path = write_tiny(tmp_path / "m.gguf", "llama", matrix_qtypes=[QT.Q4_1])
    files = ModelFiles.at(str(path))
    config = load_config(files)
    packed_only = load_model(files, config, torch.float32, torch.device("cpu"), max_positions=64,
                             cpu_kernels=True, float_copies=False)
    full = load_model(files, config, torch.float32, torch.device("cpu"), max_positions=64, cpu_kernels=True)
    layer, twin = packed_only.layers[0].mlp, full.layers[0].mlp
    assert layer.gate_up_proj.weight is None and layer.gate_up_proj.packed is not None
    assert twin.gate_up_proj.weight is not None
    # no float32 vocabulary table either: lookups read the packed rows, equal to the float table's
    assert packed_only.embed_tokens.weight is None and packed_only.embed_tokens.packed is not None
    ids = torch.tensor([0, 5, 95, 5])
    with torch.inference_mode():
        assert torch.equal(packed_only.embed(ids), full.embed(ids))
    for rows in (1, 100):   # a decode batch and a prefill chunk
        x = torch.randn(rows, 256)
        with torch.inference_mode():
            got, want = layer.forward(x), twin.forward(x)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5   # float32 rounding, in scale
