"""The CPU C kernels (kernels/cpu_kernels.c) against their torch twins, on every vector path they have."""
import ctypes
import platform
import shutil
from pathlib import Path

import pytest
import torch

from kernels import cpu_build, reference
from kernels.cpu_quant import (QuantizedTensor, pack, pack_int8, quant_matmul, quant_matmul_int8_twin,
                                quant_matmul_twin, quantize_activations, quantize_activations_c, to_int8_layout,
                                unpack)
from kernels.packed_rows import packed_rows, packed_rows_twin

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler")

# x86 builds of each vector path: this CPU's own (AVX-512 with VNNI here: the int8 path's vpdpbusd),
# AVX-512F/BW without VNNI (x86-64-v4: vpmaddubsw), AVX2+FMA, and the plain C loops (baseline x86-64 = SSE2).
X86_ARCHES = {"native": ("-march=native",), "avx512": ("-march=x86-64-v4",), "avx2": ("-march=x86-64-v3",),
              "plain": ("-march=x86-64",)}
# the CPU features each build's code needs: a build this CPU cannot run is skipped (it would die of SIGILL)
ARCH_FLAGS_NEEDED = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"},
                     "avx2": {"avx2", "fma", "bmi2", "f16c", "movbe"}}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def random_weight(bits: int, n: int, k: int, gen: torch.Generator, group: int = 32,
                  with_zero: bool | str = False) -> QuantizedTensor:
    """with_zero "q4_0": 4-bit with Q4_0's zero, -8 * scale (pack_int8 turns it into an offset)."""
    groups = k // group
    scale = torch.rand(n, groups, generator=gen) * 0.02 + 0.001
    zero = (torch.rand(n, groups, generator=gen) - 0.5) * 0.1
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        return QuantizedTensor(q, scale, -8.0 * scale if with_zero == "q4_0" else zero, 4)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return QuantizedTensor(q, scale, zero if with_zero else None, 8, group)


def half_scales(w: QuantizedTensor) -> QuantizedTensor:
    """The same weight with float16-exact scales and zeros, as GGUF's Q4_0/Q4_1/Q8_0 carry them."""
    zero = None if w.zero is None else w.zero.half().float()
    return QuantizedTensor(w.q, w.scale.half().float(), zero, w.bits, w.group)


@pytest.fixture(scope="module", params=list(X86_ARCHES) if platform.machine() in ("x86_64", "AMD64") else ["native"])
def lib(request, tmp_path_factory) -> ctypes.CDLL:
    missing = ARCH_FLAGS_NEEDED.get(request.param, set()) - cpu_flags()
    if missing:
        pytest.skip(f"this CPU cannot run the {request.param} variant (no {' '.join(sorted(missing))})")
    try:
        path = cpu_build.build(tmp_path_factory.mktemp("kernels"), arch_flags=X86_ARCHES[request.param])
    except RuntimeError as e:
        if request.param == "native":
            raise
        pytest.skip(f"cannot build the {request.param} variant here: {e}")
    return cpu_build.bind(path)


# q8 also carries the 5/6-bit types: with a zero (Q5_1, Q5_K) and with groups of 16 (Q6_K)
KINDS = {"q4": (4, 32, True), "q4_0": (4, 32, "q4_0"), "q8": (8, 32, False), "q8-zero": (8, 32, True),
         "q8-group16": (8, 16, False)}


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


@pytest.mark.parametrize("packer", [pack, pack_int8], ids=["float-activations", "int8-activations"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_rows_do_not_depend_on_batch_mates(lib: ctypes.CDLL, kind: str, packer) -> None:
    """A sequence's numbers are bit-identical whether its row runs alone or in a batch."""
    bits, group, with_zero = KINDS[kind]
    gen = torch.Generator().manual_seed(bits)
    w = packer(random_weight(bits, 48, 128, gen, group, with_zero))
    x = torch.randn(11, 128, generator=gen)
    batched = quant_matmul(x, w, lib)
    for r in range(11):
        assert torch.equal(quant_matmul(x[r:r + 1], w, lib), batched[r:r + 1])


# Batches from this many rows take the float kernels' decoded-tile path (DEC_MIN_ROWS in kernels/cpu_kernels.c)
DECODED_PATH_ROWS = 12


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n, k", [(37, 96), (200, 160)])
def test_big_batches_match_twin(lib: ctypes.CDLL, kind: str, n: int, k: int) -> None:
    """Row counts on both sides of the decoded-tile path's threshold, partial row blocks and tiles, and (37
    outputs: 3 tiles) rows split across threads."""
    bits, group, with_zero = KINDS[kind]
    gen = torch.Generator().manual_seed(n * k + bits + 2)
    w = pack(random_weight(bits, n, k, gen, group, with_zero))
    for m in (DECODED_PATH_ROWS - 1, DECODED_PATH_ROWS, DECODED_PATH_ROWS + 1, 61):
        x = torch.randn(m, k, generator=gen)
        torch.testing.assert_close(quant_matmul(x, w, lib), quant_matmul_twin(x, w), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_big_batch_rows_equal_rows_alone(lib: ctypes.CDLL, kind: str) -> None:
    """Each row of a batch on the decoded-tile path is bit-identical to the same row alone (M=1) and in a batch
    of 3 (both on the per-block path), and to the same batch run on one thread (other splits of the rows)."""
    bits, group, with_zero = KINDS[kind]
    gen = torch.Generator().manual_seed(bits + 3)
    w = pack(random_weight(bits, 37, 96, gen, group, with_zero))
    m = 2 * DECODED_PATH_ROWS + 9
    x = torch.randn(m, 96, generator=gen)
    batched = quant_matmul(x, w, lib)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(quant_matmul(x, w, lib), batched)
    finally:
        torch.set_num_threads(threads)
    for r in range(m):
        assert torch.equal(quant_matmul(x[r:r + 1], w, lib), batched[r:r + 1]), r
    for r in range(0, m - 2, 3):
        assert torch.equal(quant_matmul(x[r:r + 3], w, lib), batched[r:r + 3]), r


@pytest.mark.parametrize("packer", [pack, pack_int8], ids=["float-activations", "int8-activations"])
def test_non_contiguous_input_and_empty_batch(lib: ctypes.CDLL, packer) -> None:
    gen = torch.Generator().manual_seed(1)
    w = packer(random_weight(4, 32, 64, gen))
    x = torch.randn(64, 6, generator=gen).t()          # [6, 64], column-major
    torch.testing.assert_close(quant_matmul(x, w, lib), quant_matmul_twin(x, w), rtol=2e-5, atol=2e-5)
    assert quant_matmul(torch.empty(0, 64), w, lib).shape == (0, 32)


@pytest.mark.parametrize("packer", [pack, pack_int8, lambda w: to_int8_layout(pack(w))],
                         ids=["pack", "pack_int8", "to_int8_layout"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_pack_round_trip(kind: str, packer) -> None:
    bits, group, with_zero = KINDS[kind]
    gen = torch.Generator().manual_seed(7)
    w = random_weight(bits, 37, 96, gen, group, with_zero)
    packed = packer(w)
    assert packed.data.shape[0] == 3 and (packed.out_features, packed.in_features) == (37, 96)
    back = unpack(packed)
    assert torch.equal(back.q, w.q) and torch.equal(back.scale, w.scale)
    assert (back.zero is None) == (w.zero is None)
    if w.zero is not None:
        assert torch.equal(back.zero, w.zero)


@pytest.mark.parametrize("is_half", [True, False], ids=["float16-scales", "float32-scales"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n, k", [(37, 96), (64, 32), (16, 256), (200, 160)])
def test_int8_activations_match_twin(lib: ctypes.CDLL, kind: str, n: int, k: int, is_half: bool) -> None:
    """The int8-activation kernel against its twin; SIMD builds sum in the twin's order with FMAs (equal up to
    the twin's rare double rounding), the plain build without FMA (an ulp or so a group)."""
    bits, group, with_zero = KINDS[kind]
    gen = torch.Generator().manual_seed(n * k + bits + 1)
    qw = random_weight(bits, n, k, gen, group, with_zero)
    w = pack_int8(half_scales(qw) if is_half else qw)
    assert w.activations == "int8" and (w.scale.dtype == torch.float16) == is_half
    for m in (1, 3, 8, 9, 13):
        x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
        got = quant_matmul(x, w, lib)
        assert got.shape == (m, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, quant_matmul_int8_twin(x, w), rtol=1e-5, atol=1e-5)
        # and near the exact product: int8 rows lose ~1% (relative to the output's size)
        exact = quant_matmul_twin(x, pack(qw))
        assert (got - exact).norm() < 0.03 * exact.norm()


@pytest.mark.parametrize("kind", list(KINDS))
def test_int8_integer_sums_are_exact(lib: ctypes.CDLL, kind: str) -> None:
    """Integer rows whose groups each reach +-127 quantize to themselves (d = 1): with unit scales and integer
    zeros every float step is exact, so the kernel must give the integer product exactly (every path; the
    8-bit weights span -128..127, the VNNI build's offset trick and the others' sign trick included)."""
    bits, group, with_zero = KINDS[kind]
    gen = torch.Generator().manual_seed(11 + bits)
    n, k, m = 45, 4 * group, 10
    w = random_weight(bits, n, k, gen, group, with_zero)
    if bits == 8:
        w.q[0, :group] = -128
    zero = None if w.zero is None else torch.randint(-3, 4, w.zero.shape, generator=gen).float()
    if with_zero == "q4_0":
        zero = torch.full_like(w.scale, -8.0)
    w = QuantizedTensor(w.q, torch.ones_like(w.scale), zero, bits, group)
    x = torch.randint(-127, 128, (m, k), generator=gen).float()
    x.view(m, -1, group)[:, :, 0] = 127.0 * torch.where(torch.rand(m, k // group, generator=gen) < 0.5, -1, 1)
    want = (x.double() @ w.dequantize().double().t()).float()
    got = quant_matmul(x, pack_int8(w), lib)
    assert torch.equal(got, want)
    assert torch.equal(quant_matmul_int8_twin(x, pack_int8(w)), want)


def test_q4_0_packs_as_an_offset() -> None:
    """pack_int8 stores Q4_0 (zero = -8 * scale exactly) as scales and an offset of 8, no zeros; unpack gives
    the zero back. Any other zero stays a zero."""
    gen = torch.Generator().manual_seed(5)
    w = random_weight(4, 37, 96, gen, with_zero="q4_0")
    packed = pack_int8(w)
    assert packed.offset == 8 and packed.zero is None
    assert torch.equal(unpack(packed).dequantize(), w.dequantize())
    near = QuantizedTensor(w.q, w.scale, w.zero * (1 + 2 ** -20), 4)
    assert pack_int8(near).offset == 0 and pack_int8(near).zero is not None
    assert pack(w).offset == 0 and pack(w).zero is not None


@pytest.mark.parametrize("group", [32, 16])
def test_activation_quantization_matches_twin_exactly(lib: ctypes.CDLL, group: int) -> None:
    """The kernel's int8 rows and scales are the twin's, bit for bit: halfway cases round to even, an
    all-zero group gets d = 0, huge and tiny groups alike."""
    gen = torch.Generator().manual_seed(group)
    m, k = 7, 6 * group
    x = torch.randn(m, k, generator=gen) * torch.logspace(-20, 20, m)[:, None]
    x[1, :group] = 0.0
    x[2, :group] = torch.arange(group) - 0.5 * (group - 1)        # .5 multiples of d: ties
    x[2, group - 1] = 127.0
    q, d, qsum = quantize_activations_c(x, group, lib)
    want_q, want_d = quantize_activations(x, group)
    assert torch.equal(q, want_q) and torch.equal(d, want_d)
    assert torch.equal(qsum, want_q.view(m, -1, group).sum(-1, dtype=torch.int32))
    assert d[1, 0] == 0 and not q[1, :group].any() and q.abs().max() == 127


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
                                   q.shape[2], k_cache.shape[1], scale, int(k_cache.dtype == torch.float16),
                                   out.data_ptr())
    return out


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["f32-kv", "f16-kv"])
@pytest.mark.parametrize("heads, kv_heads, d, bs", [(9, 3, 64, 16), (4, 4, 80, 8), (8, 2, 128, 32), (3, 1, 24, 16)])
def test_paged_decode_attention_matches_twin(lib: ctypes.CDLL, heads: int, kv_heads: int, d: int, bs: int,
                                             kv_dtype: torch.dtype) -> None:
    """float16 caches too (d = 24 and 80: a tail past the 16-wide vectors), read widened exactly: the twin
    on the same halves agrees as closely as on float32 ones."""
    gen = torch.Generator().manual_seed(heads * d + bs)
    num_blocks, lens = 80, [1, 17, bs, 3 * bs + 5, 70]
    k_cache, v_cache = (torch.randn(num_blocks, bs, kv_heads, d, generator=gen).to(kv_dtype) for _ in range(2))
    width = max((n + bs - 1) // bs for n in lens) + 1
    tables = torch.randperm(num_blocks, generator=gen)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, d, generator=gen)
    lens_t = torch.tensor(lens)
    got = call_decode_attention(lib, q, k_cache, v_cache, tables, lens_t, d ** -0.5)
    want = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens_t, d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["f32-kv", "f16-kv"])
@pytest.mark.parametrize("heads, kv_heads, d, bs", [(9, 3, 64, 16), (4, 4, 80, 8), (3, 1, 24, 16)])
def test_paged_prefill_attention_matches_twin_and_each_token_as_a_decode_row(
        heads: int, kv_heads: int, d: int, bs: int, kv_dtype: torch.dtype) -> None:
    """Prompt chunks of odd lengths after odd contexts, against the twin; and every new token's output the
    same bits as that token's own decode step would give (so a preempted and recomputed sequence, or a
    prompt cut into other chunks, gets the same numbers)."""
    from kernels import cpu_ops
    if cpu_ops._library() is None:
        pytest.skip("no C compiler: the CPU op set runs the twins")
    gen = torch.Generator().manual_seed(heads * d + bs)
    num_blocks, q_lens, lens = 80, [1, 7, bs + 3, 2], [1, 19, 3 * bs + 5, 2]
    k_cache, v_cache = (torch.randn(num_blocks, bs, kv_heads, d, generator=gen).to(kv_dtype) for _ in range(2))
    width = max((n + bs - 1) // bs for n in lens) + 1
    tables = torch.randperm(num_blocks, generator=gen)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(sum(q_lens), heads, d, generator=gen)
    cu = torch.tensor([0] + q_lens).cumsum(0)
    lens_t = torch.tensor(lens)
    got = cpu_ops.paged_prefill_attention(q, k_cache, v_cache, cu, lens_t, tables, d ** -0.5)
    want = reference.paged_prefill_attention(q, k_cache, v_cache, cu, lens_t, tables, d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for b, (n, ctx) in enumerate(zip(q_lens, lens)):
        for i in range(n):
            row = int(cu[b]) + i
            alone = cpu_ops.paged_decode_attention(q[row:row + 1], k_cache, v_cache, tables[b:b + 1],
                                                   torch.tensor([ctx - n + i + 1]), d ** -0.5)
            assert torch.equal(got[row:row + 1], alone), (b, i)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["f32-kv", "f16-kv"])
@pytest.mark.parametrize("heads, kv_heads, d, bs", [(9, 3, 64, 16), (4, 4, 80, 8), (3, 1, 24, 16), (10, 1, 16, 16)])
def test_prefill_kernel_gives_each_token_its_decode_bits(lib: ctypes.CDLL, heads: int, kv_heads: int, d: int,
                                                         bs: int, kv_dtype: torch.dtype) -> None:
    """llm_paged_prefill_attention in every SIMD build: each new token's output equal, bit for bit, to the same
    build's decode kernel run for that token alone; prompts longer than a task's 16 tokens, odd contexts before
    them, head dims with a tail past the vectors, and a group past the decode kernel's 8 heads in registers."""
    gen = torch.Generator().manual_seed(heads * d + bs + 1)
    num_blocks, q_lens, lens = 90, [1, 7, 37, 2, 16], [1, 19, 3 * bs + 40, 2, 33]
    k_cache, v_cache = (torch.randn(num_blocks, bs, kv_heads, d, generator=gen).to(kv_dtype) for _ in range(2))
    width = max((n + bs - 1) // bs for n in lens) + 1
    tables = torch.randperm(num_blocks, generator=gen)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(sum(q_lens), heads, d, generator=gen)
    cu = torch.tensor([0] + q_lens).cumsum(0)
    out, lens_t = torch.empty_like(q), torch.tensor(lens)
    lib.llm_paged_prefill_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), width,
                                    cu.data_ptr(), lens_t.data_ptr(), len(lens), heads, kv_heads, d, bs,
                                    d ** -0.5, int(kv_dtype == torch.float16), out.data_ptr())
    rows = [b for b, n in enumerate(q_lens) for _ in range(n)]
    own_lens = torch.tensor([lens[b] - q_lens[b] + i + 1 for b, n in enumerate(q_lens) for i in range(n)])
    alone = call_decode_attention(lib, q, k_cache, v_cache, tables[rows].contiguous(), own_lens, d ** -0.5)
    assert torch.equal(out, alone)
    want = reference.paged_prefill_attention(q, k_cache, v_cache, cu, lens_t, tables, d ** -0.5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_float_to_half_rounds_as_torch(lib: ctypes.CDLL) -> None:
    """The fused decode stack's K/V store into a float16 cache: the bits of torch's .to(torch.float16) on the
    Python path, ties, subnormals, overflow and signed zeros included."""
    gen = torch.Generator().manual_seed(3)
    edge = torch.tensor([0.0, -0.0, 1.0, -2.5, 65504.0, 65519.99, 65520.0, -70000.0, 6.1e-5, 6.0e-5, 5.96e-8,
                         2.98e-8, 2.99e-8, 1e-9, float("inf"), float("-inf")])
    # exact ties between two halves (1 + k/1024 + 1/2048) round to even
    ties = 1.0 + (torch.arange(64, dtype=torch.float32) * 2 + 1) / 2048
    x = torch.cat([edge, ties, torch.randn(5000, generator=gen) * 10 ** torch.randint(-9, 5, (5000,), generator=gen)])
    out = torch.empty(x.shape[0], dtype=torch.float16)
    lib.llm_float_to_half(x.data_ptr(), x.shape[0], out.data_ptr())
    assert torch.equal(out.view(torch.int16), x.to(torch.float16).view(torch.int16))


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


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kv_heads, d", [(3, 64), (1, 24), (2, 13)])
def test_store_kv_matches_twin(lib: ctypes.CDLL, kv_dtype: torch.dtype, kv_heads: int, d: int) -> None:
    """llm_store_kv on views into fused qkv rows (rows of 16-multiples and not), with padded rows (-1)
    skipped: the same cache bits as the torch twin's index_copy (float16: torch's rounding, ties and
    subnormals included)."""
    gen = torch.Generator().manual_seed(11 * d + kv_heads)
    t, heads = 9, 3 * kv_heads
    scales = 10.0 ** torch.randint(-7, 4, (t, 1), generator=gen).float()   # rows from float16 subnormals to thousands
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=gen) * scales
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(t, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d:].view(t, kv_heads, d)
    slots = torch.tensor([5, 0, -1, 17, 3, -1, 30, 12, 1])
    got_k, got_v, want_k, want_v = (torch.zeros(4, 8, kv_heads, d, dtype=kv_dtype) for _ in range(4))
    lib.llm_store_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), t, kv_heads * d, slots.data_ptr(),
                     got_k.data_ptr(), got_v.data_ptr(), int(kv_dtype == torch.float16))
    reference.store_kv(k, v, want_k, want_v, slots)
    assert torch.equal(got_k.view(torch.int16 if kv_dtype == torch.float16 else torch.int32),
                       want_k.view(torch.int16 if kv_dtype == torch.float16 else torch.int32))
    assert torch.equal(got_v, want_v) and got_k.view(32, kv_heads, d)[5].abs().sum() > 0


def test_cpu_ops_store_kv_takes_the_kernel_or_the_twin() -> None:
    """cpu_ops.store_kv: the C store for float32 rows into a float32/float16 cache, the twin otherwise
    (a bfloat16 cache), with the same result either way."""
    from kernels import cpu_ops
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(4, 2, 32, generator=gen), torch.randn(4, 2, 32, generator=gen)
    slots = torch.tensor([3, -1, 0, 9])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ours, twin = [torch.zeros(2, 8, 2, 32, dtype=dtype) for _ in range(2)], [torch.zeros(2, 8, 2, 32, dtype=dtype)
                                                                                 for _ in range(2)]
        cpu_ops.store_kv(k, v, *ours, slots)
        reference.store_kv(k, v, *twin, slots)
        assert torch.equal(ours[0], twin[0]) and torch.equal(ours[1], twin[1]), dtype


@pytest.mark.parametrize("layout", [pack, pack_int8])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n, k", [(37, 96), (5, 32), (200, 160)])
def test_packed_rows_kernel_equals_its_twin(lib: ctypes.CDLL, layout, kind: str, n: int, k: int) -> None:
    """llm_packed_rows (the token embedding read from its packed table) in every SIMD build: the twin's rows bit
    for bit, float32 and float16 scales, repeated and edge ids; an id outside the table raises."""
    bits, group, with_zero = KINDS[kind]
    gen = torch.Generator().manual_seed(n * k + bits + 7)
    for weight in (random_weight(bits, n, k, gen, group, with_zero),
                   half_scales(random_weight(bits, n, k, gen, group, with_zero))):
        w = layout(weight)
        ids = torch.tensor([0, n - 1, 3 % n, 3 % n, n // 2, 1 % n, (7 * n) // 11])
        assert torch.equal(packed_rows(w, ids, lib), packed_rows_twin(w, ids))
        assert packed_rows(w, ids[:0], lib).shape == (0, k)
        for bad in (n, -1):
            with pytest.raises(IndexError):
                packed_rows(w, torch.tensor([0, bad]), lib)
