"""The CPU C kernels (kernels/cpu_kernels.c) against their torch twins, on every vector path they have."""
import ctypes
import platform
import shutil
from pathlib import Path

import pytest
import torch

from kernels import cpu_build, reference
from kernels.cpu_quant import QuantizedTensor, pack, quant_matmul, quant_matmul_twin, unpack

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler")

# x86 builds of each vector path: AVX-512, AVX2+FMA, and the plain C loops (baseline x86-64 = SSE2).
X86_ARCHES = {"native": ("-march=native",), "avx2": ("-march=x86-64-v3",), "plain": ("-march=x86-64",)}


def random_weight(bits: int, n: int, k: int, gen: torch.Generator, group: int = 32,
                  with_zero: bool = False) -> QuantizedTensor:
    groups = k // group
    scale = torch.rand(n, groups, generator=gen) * 0.02 + 0.001
    zero = (torch.rand(n, groups, generator=gen) - 0.5) * 0.1
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        return QuantizedTensor(q, scale, zero, 4)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return QuantizedTensor(q, scale, zero if with_zero else None, 8, group)


@pytest.fixture(scope="module", params=list(X86_ARCHES) if platform.machine() in ("x86_64", "AMD64") else ["native"])
def lib(request, tmp_path_factory) -> ctypes.CDLL:
    try:
        path = cpu_build.build(tmp_path_factory.mktemp("kernels"), arch_flags=X86_ARCHES[request.param])
    except RuntimeError as e:
        if request.param == "native":
            raise
        pytest.skip(f"cannot build the {request.param} variant here: {e}")
    return cpu_build.bind(path)


# q8 also carries the 5/6-bit types: with a zero (Q5_1, Q5_K) and with groups of 16 (Q6_K)
KINDS = {"q4": (4, 32, True), "q8": (8, 32, False), "q8-zero": (8, 32, True), "q8-group16": (8, 16, False)}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n, k", [(37, 96), (64, 32), (16, 256), (200, 160)])
def test_matches_twin(lib: ctypes.CDLL, kind: str, n: int, k: int) -> None:
    bits, group, with_zero = KINDS[kind]
    gen = torch.Generator().manual_seed(n * k + bits)
    w = pack(random_weight(bits, n, k, gen, group, with_zero))
    for m in (1, 3, 8, 9, 13):   # whole and partial row blocks of 8
        x = torch.randn(m, k, generator=gen)
        got = quant_matmul(x, w, lib)
        assert got.shape == (m, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, quant_matmul_twin(x, w), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_rows_do_not_depend_on_batch_mates(lib: ctypes.CDLL, kind: str) -> None:
    """A sequence's numbers are bit-identical whether its row runs alone or in a batch."""
    bits, group, with_zero = KINDS[kind]
    gen = torch.Generator().manual_seed(bits)
    w = pack(random_weight(bits, 48, 128, gen, group, with_zero))
    x = torch.randn(11, 128, generator=gen)
    batched = quant_matmul(x, w, lib)
    for r in range(11):
        assert torch.equal(quant_matmul(x[r:r + 1], w, lib), batched[r:r + 1])


def test_non_contiguous_input_and_empty_batch(lib: ctypes.CDLL) -> None:
    gen = torch.Generator().manual_seed(1)
    w = pack(random_weight(4, 32, 64, gen))
    x = torch.randn(64, 6, generator=gen).t()          # [6, 64], column-major
    torch.testing.assert_close(quant_matmul(x, w, lib), quant_matmul_twin(x, w), rtol=2e-5, atol=2e-5)
    assert quant_matmul(torch.empty(0, 64), w, lib).shape == (0, 32)


@pytest.mark.parametrize("kind", list(KINDS))
def test_pack_round_trip(kind: str) -> None:
    bits, group, with_zero = KINDS[kind]
    gen = torch.Generator().manual_seed(7)
    w = random_weight(bits, 37, 96, gen, group, with_zero)
    packed = pack(w)
    assert packed.data.shape[0] == 3 and (packed.out_features, packed.in_features) == (37, 96)
    back = unpack(packed)
    assert torch.equal(back.q, w.q) and torch.equal(back.scale, w.scale)
    assert (back.zero is None) == (w.zero is None)
    if w.zero is not None:
        assert torch.equal(back.zero, w.zero)


def test_build_is_cached_and_reports_a_missing_compiler(tmp_path: Path) -> None:
    first = cpu_build.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu_build.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    with pytest.raises(OSError):
        cpu_build.build(tmp_path / "other", compiler=str(tmp_path / "no-such-cc"))


def call_decode_attention(lib, q, k_cache, v_cache, tables, lens, scale):
    out = torch.empty_like(q)
    lib.llm_paged_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                   tables.shape[1], lens.data_ptr(), q.shape[0], q.shape[1], k_cache.shape[2],
                                   q.shape[2], k_cache.shape[1], scale, out.data_ptr())
    return out


@pytest.mark.parametrize("heads, kv_heads, d, bs", [(9, 3, 64, 16), (4, 4, 80, 8), (8, 2, 128, 32), (3, 1, 24, 16)])
def test_paged_decode_attention_matches_twin(lib: ctypes.CDLL, heads: int, kv_heads: int, d: int, bs: int) -> None:
    gen = torch.Generator().manual_seed(heads * d + bs)
    num_blocks, lens = 80, [1, 17, bs, 3 * bs + 5, 70]
    k_cache, v_cache = (torch.randn(num_blocks, bs, kv_heads, d, generator=gen) for _ in range(2))
    width = max((n + bs - 1) // bs for n in lens) + 1
    tables = torch.randperm(num_blocks, generator=gen)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, d, generator=gen)
    lens_t = torch.tensor(lens)
    got = call_decode_attention(lib, q, k_cache, v_cache, tables, lens_t, d ** -0.5)
    want = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens_t, d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows, size", [(1, 576), (5, 100), (3, 4096)])
def test_rms_norm_matches_twin(lib: ctypes.CDLL, rows: int, size: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(rows * size)
    x, weight = torch.randn(rows, size, generator=gen), torch.rand(size, generator=gen) + 0.5
    residual = torch.randn(rows, size, generator=gen) if with_residual else None
    out, residual_out = torch.empty_like(x), torch.empty_like(x) if with_residual else None
    lib.llm_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), 1e-5,
                     rows, size, out.data_ptr(), None if residual_out is None else residual_out.data_ptr())
    want, want_residual = reference.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if with_residual:
        assert torch.equal(residual_out, want_residual)


def test_cpu_op_set_has_the_twins_signatures() -> None:
    """kernels.cpu_ops is a drop-in for kernels.reference (the engine picks it on the CPU)."""
    import inspect
    from kernels import cpu_ops, get_ops
    for name, twin in vars(reference).items():
        if inspect.isfunction(twin) and not name.startswith("_") and twin.__module__ == reference.__name__:
            ours = getattr(cpu_ops, name)
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(twin).parameters), name
    assert get_ops("cpu") is cpu_ops and get_ops("cpu", cpu_kernels=False) is reference


def test_rotary_embedding_matches_twin(lib: ctypes.CDLL) -> None:
    """On views into fused qkv rows, as the attention layer calls it."""
    gen = torch.Generator().manual_seed(5)
    t, heads, kv_heads, d = 7, 6, 2, 64
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=gen)
    q = qkv[:, : heads * d].view(t, heads, d)
    k = qkv[:, heads * d: (heads + kv_heads) * d].view(t, kv_heads, d)
    positions = torch.tensor([0, 5, 3, 100, 101, 7, 63])
    freqs = torch.arange(128, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(0, d, 2) / d))[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    q_out, k_out = torch.empty(t, heads, d), torch.empty(t, kv_heads, d)
    lib.llm_rotary_embedding(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), positions.data_ptr(),
                             cos_sin.data_ptr(), t, heads, kv_heads, d, q_out.data_ptr(), k_out.data_ptr())
    want_q, want_k = reference.rotary_embedding(q, k, positions, cos_sin)
    assert torch.equal(q_out, want_q) and torch.equal(k_out, want_k)   # the same float ops, in order


@pytest.mark.parametrize("rows, size", [(1, 1536), (3, 40), (2, 17)])
def test_silu_and_mul_matches_twin(lib: ctypes.CDLL, rows: int, size: int) -> None:
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(rows, 2 * size, generator=gen) * 6   # wide range: both tails of the sigmoid
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    out = torch.empty(rows, size)
    lib.llm_silu_and_mul(x.data_ptr(), rows, size, out.data_ptr())
    torch.testing.assert_close(out, reference.silu_and_mul(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("env, reason", [({"LLM_CPU_KERNELS": "0"}, "LLM_CPU_KERNELS=0"),
                                         ({"CC": "/nonexistent/cc"}, "/nonexistent/cc")])
def test_without_the_kernels_the_cpu_runs_the_twins(tmp_path: Path, env: dict, reason: str) -> None:
    """No compiler (or switched off): the op set is the torch twins and the loader keeps float32 weights."""
    import os
    import subprocess
    import sys
    code = ("from kernels import cpu_build, get_ops, reference\n"
            "assert cpu_build.load_library() is None and get_ops('cpu') is reference\n"
            "print(cpu_build.load_error)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LLM_HOME": str(tmp_path), **env},
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert reason in out.stdout


def test_mixed_shards_widen_to_one_exact_weight() -> None:
    """Q4_K_M fuses Q4_K q/k (4-bit, groups of 32) with a Q6_K v (8-bit, groups of 16): one 8-bit weight."""
    from kernels.cpu_quant import cat_rows
    gen = torch.Generator().manual_seed(3)
    q4, q6 = random_weight(4, 24, 64, gen), random_weight(8, 8, 64, gen, group=16)
    fused = cat_rows([q4, q6, q4])
    assert (fused.bits, fused.group) == (8, 16) and fused.zero is not None
    assert torch.equal(fused.dequantize(), torch.cat([q4.dequantize(), q6.dequantize(), q4.dequantize()]))
    assert torch.equal(unpack(pack(fused)).dequantize(), fused.dequantize())
