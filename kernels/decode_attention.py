"""Paged decode attention as split-KV (flash-decoding): stage 1 attends over one slice of each sequence's
context per program and writes a partial output plus its log-sum-exp; stage 2 merges the slices.

The launch grid is (batch, kv heads, splits) with the split count fixed by shapes alone (the block-table
width, i.e. max_model_len), never by the context lengths, so a captured CUDA graph stays valid on replay.
All query heads that share a KV head run in one program (GQA packing), so each K/V tile is read once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import autotune
from kernels.autotune import Config, TuneJob, TuneKey
from kernels.kv_store import online_softmax_step, paged_attention_output, paged_kv_rows

MIN_SPLIT_TOKENS = 128   # below this a split's fixed cost outweighs the parallelism it adds
CANDIDATES: tuple[Config, ...] = tuple(
    {"BLOCK_N": n, "MAX_SPLITS": s, "num_warps": w, "num_stages": st}
    for n, s, w, st in ((32, 16, 4, 2), (64, 16, 4, 2), (64, 32, 4, 2), (32, 32, 4, 3), (64, 8, 4, 2),
                        (128, 16, 8, 2), (16, 16, 2, 2), (64, 64, 4, 2), (32, 64, 2, 2)))


@triton.jit
def _decode_stage1_kernel(
    q_ptr,               # [B, H, D]: unit stride within a head
    k_cache_ptr,         # [num_blocks, BLOCK_SIZE, KVH, D]
    v_cache_ptr,         # [num_blocks, BLOCK_SIZE, KVH, D], same strides as k_cache
    block_tables_ptr,    # [B, max_blocks] int32/int64
    context_lens_ptr,    # [B] int
    mid_out_ptr,         # [B, H, NUM_SPLITS, D] float32: each split's output, already normalised
    mid_lse_ptr,         # [B, H, NUM_SPLITS] float32: each split's log2-sum-exp2 (-inf when empty)
    qk_scale,            # softmax scale * log2(e): the kernel works in base 2
    stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
    group, head_dim,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * group

    ctx = tl.load(context_lens_ptr + b).to(tl.int32)
    # each split covers a whole number of BLOCK_N tiles; trailing splits may be empty
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < group
    d_mask = d < head_dim
    heads = kv_head * group + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)              # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n_start in range(start, end, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        n_mask = n < end
        row = paged_kv_rows(block_tables_ptr, b, stride_bt, n, n_mask, kv_head, stride_cb, stride_ct, stride_ch,
                            BLOCK_SIZE)                                                   # [BLOCK_N]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale          # [BLOCK_G, BLOCK_N]
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # NOTE: every tile holds at least one live key, so the running max is finite and no NaN can appear
        m_i, l_i, acc = online_softmax_step(qk, v, m_i, l_i, acc, DOT_PRECISION)

    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    mid = (b * num_heads + heads) * NUM_SPLITS + split                                  # [BLOCK_G]
    tl.store(mid_out_ptr + mid[:, None] * head_dim + d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(mid_lse_ptr + mid, lse, mask=g_mask)


@triton.jit
def _decode_stage2_kernel(
    mid_out_ptr,     # [B, H, NUM_SPLITS, D] float32
    mid_lse_ptr,     # [B, H, NUM_SPLITS] float32
    out_ptr,         # [B, H, D] contiguous, q's dtype
    head_dim,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)   # b * H + h
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    lse = tl.load(mid_lse_ptr + row * NUM_SPLITS + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)     # an empty context (a padded row) yields zeros, not NaN
    w = tl.exp2(lse - m)                          # [BLOCK_S]
    parts = tl.load(mid_out_ptr + (row * NUM_SPLITS + s[:, None]) * head_dim + d[None, :],
                    mask=s_mask[:, None] & (d[None, :] < head_dim), other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * head_dim + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def _key(head_dim: int, group: int, batch: int, max_len: int, dtype: torch.dtype) -> TuneKey:
    bucket = f"d{head_dim}_g{group}_b{autotune.pow2_bucket(batch, hi=512)}_l{autotune.pow2_bucket(max_len)}"
    return TuneKey("decode_attention", bucket, str(dtype).removeprefix("torch."))


def num_splits(max_len: int, config: Config) -> int:
    """Splits per sequence: a function of the table width (max_model_len) and config only."""
    return max(1, min(config["MAX_SPLITS"], triton.cdiv(max_len, MIN_SPLIT_TOKENS)))


def _launch(q, k_cache, v_cache, block_tables, context_lens, scale, out, config: Config) -> None:
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    splits = num_splits(block_tables.shape[1] * block_size, config)
    mid_out = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_stage1_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, mid_out, mid_lse, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        group, head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=config["BLOCK_N"],
        BLOCK_SIZE=block_size, NUM_SPLITS=splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    _decode_stage2_kernel[(batch, num_heads)](
        mid_out, mid_lse, out, head_dim,
        NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None) -> torch.Tensor:
    """Same contract as kernels.reference.paged_decode_attention.

    max_context_len is accepted for the twin's signature and ignored: the grid must not depend on it.
    """
    batch, num_heads, head_dim = q.shape
    q, out = paged_attention_output(q, k_cache, v_cache)
    if batch == 0:
        return out
    max_len = block_tables.shape[1] * k_cache.shape[1]
    config = autotune.chosen(_key(head_dim, num_heads // k_cache.shape[2], batch, max_len, q.dtype),
                             CANDIDATES[0])
    _launch(q, k_cache, v_cache, block_tables, context_lens, scale, out, config)
    return out


def tune_jobs(batch_sizes: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
              max_model_len: int, dtype: torch.dtype, device: torch.device) -> list[TuneJob]:
    """One job per batch bucket, timed at full context (the worst case the graphs will replay)."""
    max_blocks = triton.cdiv(max_model_len, block_size)
    # one shared pool of random blocks caps tuning memory; tables draw from it with repeats
    num_blocks = min(max(batch_sizes) * max_blocks, 16384)
    # built only when a job is timed (autotune.lazy): a warm start allocates none of it
    caches = autotune.lazy(lambda: tuple(torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                                                     device=device) for _ in "kv"))

    def make(batch: int):
        q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
        return (q, *caches(), torch.randint(0, num_blocks, (batch, max_blocks), device=device),
                torch.full((batch,), max_model_len, device=device), head_dim ** -0.5, torch.empty_like(q))

    jobs = []
    for batch in sorted({autotune.pow2_bucket(b, hi=512) for b in batch_sizes}):
        args = autotune.lazy(lambda batch=batch: make(batch))
        key = _key(head_dim, num_heads // num_kv_heads, batch, max_blocks * block_size, dtype)
        jobs.append(TuneJob(key, CANDIDATES, lambda c, args=args: _launch(*args(), c)))
    return jobs
