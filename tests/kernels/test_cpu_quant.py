"""The quantized CPU kernel (kernels/cpu_quant.c) against its torch twin, on every code path it has."""
import ctypes
import platform
import shutil
from pathlib import Path

import pytest
import torch

from kernels import cpu_quant, reference
from kernels.cpu_quant import QuantizedTensor, pack, quant_matmul, unpack

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler")

# x86 builds of each vector path: AVX-512, AVX2+FMA, and the plain C loops (baseline x86-64 = SSE2).
X86_ARCHES = {"native": ("-march=native",), "avx2": ("-march=x86-64-v3",), "plain": ("-march=x86-64",)}


def random_weight(bits: int, n: int, k: int, gen: torch.Generator) -> QuantizedTensor:
    groups = k // 32
    scale = torch.rand(n, groups, generator=gen) * 0.02 + 0.001
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        return QuantizedTensor(q, scale, (torch.rand(n, groups, generator=gen) - 0.5) * 0.1, 4)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return QuantizedTensor(q, scale, None, 8)


@pytest.fixture(scope="module", params=list(X86_ARCHES) if platform.machine() in ("x86_64", "AMD64") else ["native"])
def lib(request, tmp_path_factory) -> ctypes.CDLL:
    try:
        path = cpu_quant.build(tmp_path_factory.mktemp("kernels"), arch_flags=X86_ARCHES[request.param])
    except RuntimeError as e:
        if request.param == "native":
            raise
        pytest.skip(f"cannot build the {request.param} variant here: {e}")
    return cpu_quant._bind(path)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n, k", [(37, 96), (64, 32), (16, 256), (200, 160)])
def test_matches_twin(lib: ctypes.CDLL, bits: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n * k + bits)
    w = pack(random_weight(bits, n, k, gen))
    for m in (1, 3, 4, 5, 9):   # whole and partial row blocks of 4
        x = torch.randn(m, k, generator=gen)
        got = quant_matmul(x, w, lib)
        assert got.shape == (m, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, reference.quant_matmul(x, w), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_do_not_depend_on_batch_mates(lib: ctypes.CDLL, bits: int) -> None:
    """A sequence's numbers are bit-identical whether its row runs alone or in a batch."""
    gen = torch.Generator().manual_seed(bits)
    w = pack(random_weight(bits, 48, 128, gen))
    x = torch.randn(11, 128, generator=gen)
    batched = quant_matmul(x, w, lib)
    for r in range(11):
        assert torch.equal(quant_matmul(x[r:r + 1], w, lib), batched[r:r + 1])


def test_non_contiguous_input_and_empty_batch(lib: ctypes.CDLL) -> None:
    gen = torch.Generator().manual_seed(1)
    w = pack(random_weight(4, 32, 64, gen))
    x = torch.randn(64, 6, generator=gen).t()          # [6, 64], column-major
    torch.testing.assert_close(quant_matmul(x, w, lib), reference.quant_matmul(x, w), rtol=2e-5, atol=2e-5)
    assert quant_matmul(torch.empty(0, 64), w, lib).shape == (0, 32)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trip(bits: int) -> None:
    gen = torch.Generator().manual_seed(7)
    w = random_weight(bits, 37, 96, gen)
    packed = pack(w)
    assert packed.data.shape[0] == 3 and (packed.out_features, packed.in_features) == (37, 96)
    back = unpack(packed)
    assert torch.equal(back.q, w.q) and torch.equal(back.scale, w.scale)
    assert (back.zero is None) == (w.zero is None)
    if w.zero is not None:
        assert torch.equal(back.zero, w.zero)


def test_build_is_cached_and_reports_a_missing_compiler(tmp_path: Path) -> None:
    first = cpu_quant.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu_quant.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    with pytest.raises(OSError):
        cpu_quant.build(tmp_path / "other", compiler=str(tmp_path / "no-such-cc"))
