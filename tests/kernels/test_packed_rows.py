"""kernels/packed_rows.py (the C kernel and its torch twin) against the dequantized table: equal rows, every
layout, odd shapes."""
import pytest
import torch

from kernels.cpu_quant import QuantizedTensor, pack, pack_int8, unpack
from kernels.packed_rows import packed_rows, packed_rows_twin


def quantized(n: int, k: int, bits: int, group: int, zero: bool | str, seed: int) -> QuantizedTensor:
    """zero "q4_0": Q4_0's -8 * scale (pack_int8 keeps it as an offset)."""
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    else:
        q = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)
    # float16-representable scales (as GGUF's), so pack_int8 keeps them as float16 too
    scale = (torch.rand(n, k // group, generator=g) * 0.1).half().float()
    z = (torch.randn(n, k // group, generator=g) * 0.1).half().float() if zero else None
    if zero == "q4_0":
        z = -8.0 * scale
    return QuantizedTensor(q, scale, z, bits, group)


@pytest.mark.parametrize("rows", [packed_rows, packed_rows_twin])
@pytest.mark.parametrize("layout", [pack, pack_int8])
@pytest.mark.parametrize("bits,group,zero", [(4, 32, True), (4, 32, "q4_0"), (8, 32, False), (8, 32, True),
                                             (8, 16, True)])
@pytest.mark.parametrize("n,k", [(37, 64), (16, 96), (5, 32)])
def test_rows_equal_the_dequantized_table(rows, layout, bits, group, zero, n, k):
    if bits == 4 and group != 32:
        pytest.skip("4-bit weights come in groups of 32")
    w = layout(quantized(n, k, bits, group, zero, seed=n * k + bits))
    table = unpack(w).dequantize()
    ids = torch.tensor([0, n - 1, 3 % n, 3 % n, n // 2, 1 % n])
    assert torch.equal(rows(w, ids), table[ids])
    assert rows(w, ids[:0]).shape == (0, k)
