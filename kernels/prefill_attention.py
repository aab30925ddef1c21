"""Prefill / extend attention over the paged cache: variable-length, causal, with a cached prefix.

Queries are packed back to back (cu_seqlens_q); each sequence's keys, its cached prefix and the new tokens
alike, are read from the paged cache. Flash-attention style: one program per (query tile, sequence, head),
an online softmax over key tiles up to the tile's last query position.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import autotune
from kernels.autotune import Config, TuneJob, TuneKey
from kernels.kv_store import online_softmax_step, paged_attention_output, paged_kv_rows

CANDIDATES: tuple[Config, ...] = tuple(
    {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
    for m, n, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 4, 2), (32, 32, 4, 2),
                       (128, 128, 8, 2), (64, 128, 4, 2)))


@triton.jit
def _prefill_kernel(
    q_ptr,              # [T, H, D]: unit stride within a head
    k_cache_ptr,        # [num_blocks, BLOCK_SIZE, KVH, D]
    v_cache_ptr,        # [num_blocks, BLOCK_SIZE, KVH, D], same strides as k_cache
    out_ptr,            # [T, H, D] contiguous
    cu_seqlens_ptr,     # [B+1] int: query offsets
    context_lens_ptr,   # [B] int: tokens per sequence including the new ones
    block_tables_ptr,   # [B, max_blocks] int
    qk_scale,           # softmax scale * log2(e)
    stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
    group, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    num_heads = tl.num_programs(2)
    kv_head = head // group
    q_start = tl.load(cu_seqlens_ptr + b).to(tl.int64)
    q_len = (tl.load(cu_seqlens_ptr + b + 1) - q_start).to(tl.int32)
    if m_block * BLOCK_M < q_len:
        ctx = tl.load(context_lens_ptr + b).to(tl.int32)
        prefix = ctx - q_len                      # new token i sits at position prefix + i
        m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        m_mask = m < q_len
        d_mask = d < head_dim
        q = tl.load(q_ptr + (q_start + m[:, None]) * stride_qt + head * stride_qh + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)            # [BLOCK_M, BLOCK_D]
        q_pos = prefix + m

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_end = tl.minimum(ctx, prefix + (m_block + 1) * BLOCK_M)   # past the tile's last query: unseen
        for n_start in range(0, kv_end, BLOCK_N):
            n = n_start + tl.arange(0, BLOCK_N)
            n_mask = n < kv_end
            row = paged_kv_rows(block_tables_ptr, b, stride_bt, n, n_mask, kv_head, stride_cb, stride_ct,
                                stride_ch, BLOCK_SIZE)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale     # [BLOCK_M, BLOCK_N]
            allowed = n_mask[None, :] & (n[None, :] <= q_pos[:, None])
            qk = tl.where(allowed, qk, float("-inf"))
            # NOTE: key 0 is visible to every row (q_pos >= 0), so the running max is finite from the first tile
            m_i, l_i, acc = online_softmax_step(qk, v, m_i, l_i, acc, DOT_PRECISION)
        out = acc / l_i[:, None]
        tl.store(out_ptr + ((q_start + m[:, None]) * num_heads + head) * head_dim + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _key(head_dim: int, max_query_len: int, dtype: torch.dtype) -> TuneKey:
    bucket = f"d{head_dim}_q{autotune.pow2_bucket(max_query_len, lo=16, hi=8192)}"
    return TuneKey("prefill_attention", bucket, str(dtype).removeprefix("torch."))


def _launch(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_query_len, out,
            config: Config) -> None:
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    grid = (triton.cdiv(max_query_len, config["BLOCK_M"]), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        num_heads // num_kv_heads, head_dim,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            block_tables: torch.Tensor, scale: float,
                            max_query_len: int | None = None,
                            max_context_len: int | None = None) -> torch.Tensor:
    """Same contract as kernels.reference.paged_prefill_attention (max_context_len is not needed)."""
    t, num_heads, head_dim = q.shape
    q, out = paged_attention_output(q, k_cache, v_cache)
    if t == 0:
        return out
    if max_query_len is None:   # a host sync; the engine passes it (prefill runs eagerly anyway)
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    config = autotune.chosen(_key(head_dim, max_query_len, q.dtype), CANDIDATES[0])
    _launch(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_query_len, out, config)
    return out


def tune_jobs(query_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, device: torch.device) -> list[TuneJob]:
    """One job per query-length bucket: a single sequence prefilling that many tokens from scratch."""
    jobs = []
    def make(q_len: int):   # built only when the job is timed (autotune.lazy)
        num_blocks = triton.cdiv(q_len, block_size)
        k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        q = torch.randn(q_len, num_heads, head_dim, dtype=dtype, device=device)
        return (q, k_cache, torch.randn_like(k_cache), torch.tensor([0, q_len], device=device),
                torch.tensor([q_len], device=device), torch.randperm(num_blocks, device=device)[None, :],
                head_dim ** -0.5, q_len, torch.empty_like(q))

    for q_len in sorted({autotune.pow2_bucket(n, lo=16, hi=8192) for n in query_lens}):
        args = autotune.lazy(lambda q_len=q_len: make(q_len))
        jobs.append(TuneJob(_key(head_dim, q_len, dtype), CANDIDATES, lambda c, args=args: _launch(*args(), c)))
    return jobs
