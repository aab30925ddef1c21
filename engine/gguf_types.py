"""The GGML tensor types we read, by id, without torch (the server reads GGUF headers for the tokenizer;
engine/dequant.py holds the dequantizers and checks it covers exactly these)."""
from __future__ import annotations

from gguf.constants import GGMLQuantizationType as QT

SUPPORTED_QTYPES: frozenset[int] = frozenset(int(t) for t in (
    QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
    QT.F32, QT.F16, QT.BF16))


def type_name(qtype: int) -> str:
    """A type for messages: 'Q4_K (12)', or 'unknown type 99' for ids the gguf package lacks."""
    try:
        return f"{QT(qtype).name} ({int(qtype)})"
    except ValueError:
        return f"unknown type {int(qtype)}"
