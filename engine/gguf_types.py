"""The GGML tensor types we read, by id, without torch (the server reads GGUF headers for the tokenizer;
engine/dequant.py holds the dequantizers and checks it covers exactly these).

The ids and block sizes are facts of the GGUF format, written out here rather than imported from the `gguf`
package: importing it costs ~130 ms (its __init__ loads its reader, writer and vocabulary modules), on the
critical path of every engine start. tests/engine/test_gguf.py checks this table against the package.
"""
from __future__ import annotations

from enum import IntEnum


class QT(IntEnum):
    """GGML tensor type ids, as GGUF files store them (the gguf package's GGMLQuantizationType)."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30


# (elements per block, bytes per block) of the types we read
QUANT_SIZES: dict[int, tuple[int, int]] = {
    QT.F32: (1, 4), QT.F16: (1, 2), QT.BF16: (1, 2),
    QT.Q4_0: (32, 18), QT.Q4_1: (32, 20), QT.Q5_0: (32, 22), QT.Q5_1: (32, 24), QT.Q8_0: (32, 34),
    QT.Q2_K: (256, 84), QT.Q3_K: (256, 110), QT.Q4_K: (256, 144), QT.Q5_K: (256, 176), QT.Q6_K: (256, 210),
}

SUPPORTED_QTYPES: frozenset[int] = frozenset(int(t) for t in QUANT_SIZES)


def type_name(qtype: int) -> str:
    """A type for messages: 'Q4_K (12)', or 'unknown type 99' for ids neither we nor the gguf package know."""
    try:
        return f"{QT(qtype).name} ({int(qtype)})"
    except ValueError:
        pass
    try:   # a newer type: the gguf package may name it (an error path: its import cost does not matter here)
        from gguf.constants import GGMLQuantizationType
        return f"{GGMLQuantizationType(qtype).name} ({int(qtype)})"
    except (ImportError, ValueError):
        return f"unknown type {int(qtype)}"
