"""engine.dequant against gguf-py's numpy reference (gguf.quants.dequantize), type by type."""
import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from engine.dequant import SUPPORTED_QTYPES, UnsupportedQuantization, dequantize, split_quantized

# Byte offsets of the f16 scale fields inside one block: random bytes there could be inf/nan.
F16_FIELDS = {
    QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
}
QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
# Odd row counts, a 1-D tensor, and a 3-D one; the row length is in blocks of 256 (the K-quant block).
SHAPES = [(7, 256), (1, 512), (256,), (3, 5, 256)]


def random_blocks(qtype: QT, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Every bit pattern a block can hold, except that its f16 scales are finite."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    num_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, size=(num_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = (rng.standard_normal(num_blocks) * 0.05).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(num_blocks, 2)
    return blocks.reshape(-1)


def check(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> None:
    expected = torch.from_numpy(np.asarray(quants.dequantize(raw.reshape(-1), qtype), dtype=np.float32))
    got = dequantize(torch.from_numpy(raw.reshape(-1)), qtype, shape, torch.float32)
    assert got.shape == shape and got.dtype == torch.float32
    assert torch.isfinite(expected).all()
    assert torch.equal(got, expected.reshape(shape))  # bit-exact: same f32 ops in the same order


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_by_gguf_py(qtype: QT, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(int(qtype) * 100 + len(shape))
    values = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3.0, size=shape[:-1] + (1,))
    raw = np.ascontiguousarray(quants.quantize(values, qtype)).view(np.uint8)
    check(raw, qtype, shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", sorted(F16_FIELDS), ids=lambda t: QT(t).name)
def test_random_blocks(qtype: QT, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(int(qtype) * 1000 + len(shape))
    check(random_blocks(QT(qtype), shape, rng), QT(qtype), shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q4_1, QT.Q6_K], ids=lambda t: t.name)
def test_cast_at_the_end(qtype: QT, dtype: torch.dtype) -> None:
    shape = (5, 256)
    rng = np.random.default_rng(3)
    if qtype in F16_FIELDS:
        raw = random_blocks(qtype, shape, rng)
    else:
        raw = np.ascontiguousarray(quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype))
        raw = raw.view(np.uint8).reshape(-1)
    expected = torch.from_numpy(np.asarray(quants.dequantize(raw, qtype), dtype=np.float32)).to(dtype)
    got = dequantize(torch.from_numpy(raw), qtype, shape, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, expected.reshape(shape))


def test_f32_as_float32_is_a_view() -> None:
    raw = torch.arange(12, dtype=torch.float32).view(torch.uint8)
    out = dequantize(raw, QT.F32, (3, 4), torch.float32)
    assert out.data_ptr() == raw.data_ptr()
    assert torch.equal(out, torch.arange(12, dtype=torch.float32).reshape(3, 4))


def test_supported_set_is_exactly_the_brief() -> None:
    names = {QT(t).name for t in SUPPORTED_QTYPES}
    assert names == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.TQ1_0, QT.Q8_1, QT.I32, 999], ids=str)
def test_unsupported_type_named(qtype: int) -> None:
    with pytest.raises(UnsupportedQuantization) as info:
        dequantize(torch.zeros(1024, dtype=torch.uint8), qtype, (256,), torch.float32)
    assert isinstance(info.value, ValueError)
    assert (QT(qtype).name if qtype != 999 else "999") in str(info.value)


def test_wrong_byte_count_or_row_length() -> None:
    with pytest.raises(ValueError, match="bytes"):
        dequantize(torch.zeros(35, dtype=torch.uint8), QT.Q8_0, (32,), torch.float32)
    with pytest.raises(ValueError, match="block size"):
        dequantize(torch.zeros(34, dtype=torch.uint8), QT.Q8_0, (2, 16), torch.float32)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q5_1, QT.Q5_K, QT.Q6_K, QT.Q8_0],
                         ids=lambda t: t.name)
def test_split_quantized_is_the_same_weight(qtype: QT) -> None:
    """The integer form the CPU kernel reads (scale * q + zero per group) holds the dequantized values."""
    shape = (7, 512)
    raw = torch.from_numpy(random_blocks(qtype, shape, np.random.default_rng(int(qtype))))
    w = split_quantized(raw, qtype, shape)
    group = 16 if qtype == QT.Q6_K else 32
    assert w is not None and w.q.shape == shape and w.group == group and w.scale.shape == (7, 512 // group)
    assert w.bits == (4 if qtype in (QT.Q4_0, QT.Q4_1, QT.Q4_K) else 8)
    assert w.q.dtype == (torch.int8 if w.bits == 8 else torch.uint8)
    if w.bits == 4:
        assert int(w.q.max()) <= 15
    expected = dequantize(raw, qtype, shape, torch.float32)
    if qtype == QT.Q4_0:  # d * q - 8d instead of (q - 8) * d: equal up to rounding
        torch.testing.assert_close(w.dequantize(), expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(w.dequantize(), expected)


def test_split_quantized_skips_other_types() -> None:
    raw = torch.from_numpy(random_blocks(QT.Q3_K, (2, 256), np.random.default_rng(0)))
    assert split_quantized(raw, QT.Q3_K, (2, 256)) is None
    assert split_quantized(torch.zeros(64 * 4, dtype=torch.uint8), QT.F32, (64,)) is None
