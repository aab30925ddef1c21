"""scripts/requantize_gguf.py: every quantized matrix in the new type, values kept within its rounding, metadata kept."""
import importlib.util
from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType as QT

from engine.gguf import read_gguf
from tests.engine.test_gguf import write_tiny

ROOT = Path(__file__).resolve().parent.parent


def script():
    spec = importlib.util.spec_from_file_location("requantize_gguf", ROOT / "scripts" / "requantize_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target,tolerance", [("Q8_0", 0.02), ("Q4_0", 0.35)])
def test_requantized_file_reads_back(tmp_path, target, tolerance):
    src = write_tiny(tmp_path / "src.gguf", "llama", matrix_qtypes=[QT.Q4_1, QT.F16, QT.Q8_0])
    dst = tmp_path / "dst.gguf"
    counts = script().requantize(src, dst, QT[target])
    a, b = read_gguf(str(src)), read_gguf(str(dst))
    assert a.metadata.keys() | {"general.file_type"} == b.metadata.keys()
    assert b.metadata["general.file_type"] == {"Q8_0": 7, "Q4_0": 2}[target]
    assert {k: v for k, v in a.metadata.items() if k != "general.file_type"} == \
        {k: v for k, v in b.metadata.items() if k != "general.file_type"}
    types_a = {t.name: t.qtype for t in a.tensor_infos}
    types_b = {t.name: t.qtype for t in b.tensor_infos}
    assert types_a.keys() == types_b.keys()
    for name, qtype in types_a.items():
        float_type = qtype in (QT.F32, QT.F16)
        assert types_b[name] == (qtype if float_type else QT[target]), name
        x, y = a.read_tensor(name, torch.float32), b.read_tensor(name, torch.float32)
        if float_type:
            assert torch.equal(x, y), name
        else:
            assert (x - y).abs().max() <= tolerance * x.abs().max(), name
    assert counts["requantized"] == sum(t not in (QT.F32, QT.F16) for t in types_a.values())
