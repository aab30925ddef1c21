"""Paged decode (split-KV) and prefill/extend attention against their torch twins."""
import pytest
import torch

from kernels import reference as ref
from kernels import decode_attention
from kernels.decode_attention import paged_decode_attention
from kernels.prefill_attention import paged_prefill_attention

# the twin runs SDPA in the input dtype on the GPU, so fp16 gets a little more room than one rounding
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _paged_kv(context_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, device,
              dtype=torch.float32, extra_blocks: int = 0):
    """Random caches, and block tables that give each sequence distinct blocks in scrambled order."""
    blocks_per_seq = max(-(-n // block_size) for n in context_lens) + extra_blocks
    num_blocks = len(context_lens) * blocks_per_seq + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=device)[:len(context_lens) * blocks_per_seq]
    return k_cache, v_cache, tables.view(len(context_lens), blocks_per_seq)


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (3, 80, 8), (6, 64, 8)])
def test_decode_matches_twin(device, num_kv_heads, head_dim, block_size):
    torch.manual_seed(num_kv_heads * head_dim + block_size)
    lens = [1, 37, 130, 16, 9]
    k_cache, v_cache, tables = _paged_kv(lens, block_size, num_kv_heads, head_dim, device)
    context_lens = torch.tensor(lens, device=device)
    # q as a slice of a fused qkv row: strided per token
    q = torch.randn(len(lens), 6 + 2 * num_kv_heads, head_dim, device=device)[:, :6]
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125, max(lens))
    want = ref.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125, max(lens))
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("max_splits,block_n", [(1, 16), (3, 16), (16, 32)])
def test_decode_split_merge_is_exact(device, max_splits, block_n):
    """The same answer however the context is split (incl. splits left empty by short contexts)."""
    torch.manual_seed(max_splits)
    lens = [300, 2, 45]
    k_cache, v_cache, tables = _paged_kv(lens, 16, 2, 64, device, extra_blocks=120)  # 2k-token tables
    q = torch.randn(3, 6, 64, device=device)
    config = {"BLOCK_N": block_n, "MAX_SPLITS": max_splits, "num_warps": 4, "num_stages": 2}
    assert decode_attention.num_splits(tables.shape[1] * 16, config) == max_splits
    out = torch.empty_like(q)
    decode_attention._launch(q, k_cache, v_cache, tables, torch.tensor(lens, device=device), 0.1, out, config)
    want = ref.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens, device=device), 0.1)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


def test_decode_empty_row_gives_zeros(device):
    """A padded graph row (context length 0) yields zeros, not NaN, and leaves its neighbours exact."""
    k_cache, v_cache, tables = _paged_kv([40, 40], 8, 2, 64, device)
    q = torch.randn(2, 6, 64, device=device)
    lens = torch.tensor([0, 40], device=device)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1:], ref.paged_decode_attention(q[1:], k_cache, v_cache, tables[1:], lens[1:], 0.1),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (3, 80, 8)])
def test_prefill_with_cached_prefix_matches_twin(device, num_kv_heads, head_dim, block_size):
    torch.manual_seed(num_kv_heads + head_dim)
    # fresh prompt, single new token over a long prefix, chunk over a prefix, prompt of one token
    q_lens = [70, 1, 23, 1]
    lens = [70, 50, 61, 1]
    k_cache, v_cache, tables = _paged_kv(lens, block_size, num_kv_heads, head_dim, device)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device=device)
    wide = torch.randn(sum(q_lens), 6 + 2 * num_kv_heads, head_dim, device=device)
    q = wide[:, :6]
    context_lens = torch.tensor(lens, device=device)
    out = paged_prefill_attention(q, k_cache, v_cache, cu, context_lens, tables, 0.11, max(q_lens), max(lens))
    want = ref.paged_prefill_attention(q, k_cache, v_cache, cu, context_lens, tables, 0.11)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_gpu_llama8b_batch64_4k(dtype):
    torch.manual_seed(0)
    lens = torch.randint(1, 4097, (64,)).tolist()
    lens[0], lens[1] = 4096, 1
    k_cache, v_cache, tables = _paged_kv(lens, 16, 8, 128, "cuda", dtype)
    q = torch.randn(64, 32, 128, device="cuda", dtype=dtype)
    context_lens = torch.tensor(lens, device="cuda")
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 128 ** -0.5)
    want = ref.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 128 ** -0.5)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_gpu_llama8b_chunks(dtype):
    torch.manual_seed(1)
    q_lens, lens = [1000, 512, 37, 1], [1000, 3000, 37, 4096]
    k_cache, v_cache, tables = _paged_kv(lens, 16, 8, 128, "cuda", dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device="cuda")
    q = torch.randn(sum(q_lens), 32, 128, device="cuda", dtype=dtype)
    context_lens = torch.tensor(lens, device="cuda")
    out = paged_prefill_attention(q, k_cache, v_cache, cu, context_lens, tables, 128 ** -0.5, max(q_lens))
    want = ref.paged_prefill_attention(q, k_cache, v_cache, cu, context_lens, tables, 128 ** -0.5)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)


@pytest.mark.gpu
def test_decode_cuda_graph_replay_follows_new_lengths():
    """Captured once, replayed after the context lengths grow: still equal to the twin."""
    torch.manual_seed(2)
    k_cache, v_cache, tables = _paged_kv([2048] * 8, 16, 2, 64, "cuda", torch.bfloat16)
    q = torch.randn(8, 6, 64, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((8,), 5, device="cuda")
    paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)   # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    lens.copy_(torch.tensor([1, 2048, 700, 33, 5, 1000, 1999, 64]))
    graph.replay()
    want = ref.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(out, want, rtol=1.6e-2, atol=1.6e-2)
