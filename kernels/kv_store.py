"""The paged KV cache in Triton: the write (each new token's K and V rows to their cache slot; slot -1, a
padded row, is skipped) and the pieces both attention kernels read it with."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr,              # [T, kvh, D]: any token/head strides, unit stride within a head
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, kvh, D] contiguous: slot s starts at s * kvh * D
    slot_ptr,                  # [T] int64
    stride_kt, stride_kh, stride_vt, stride_vh,
    num_kv_heads, head_dim,
    BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_HEADS)[:, None]
        cols = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < num_kv_heads) & (cols < head_dim)
        dst = slot * num_kv_heads * head_dim + heads * head_dim + cols
        k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + cols, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + cols, mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Same contract as kernels.reference.store_kv (no host sync: the -1 check happens on the device)."""
    t, num_kv_heads, head_dim = k.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the paged cache is one contiguous buffer"
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and slot_mapping.shape[0] == t
    if t == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    block_heads = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping,
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1), num_kv_heads, head_dim,
                           BLOCK_HEADS=block_heads, BLOCK_D=block_d,
                           num_warps=max(1, min(8, block_heads * block_d // 512)))


@triton.jit
def paged_kv_rows(block_tables_ptr, b, stride_bt, n, n_mask, kv_head, stride_cb, stride_ct, stride_ch,
                  BLOCK_SIZE: tl.constexpr):
    """Cache offsets of the K/V rows of positions n (a tile) of sequence b, for one KV head (both attention
    kernels read the paged cache through this)."""
    page = tl.load(block_tables_ptr + b * stride_bt + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    return page * stride_cb + (n % BLOCK_SIZE) * stride_ct + kv_head * stride_ch


@triton.jit
def online_softmax_step(qk, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one masked score tile (base 2, [rows, BLOCK_N]) and its values into the running max, sum and
    output; returns the new (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def paged_attention_output(q: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the paged-attention inputs both attention kernels share; (q with unit last stride, empty out).

    q: [T, num_heads, D]; caches: [num_blocks, block_size, num_kv_heads, D] with one layout.
    """
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert q.shape[1] % k_cache.shape[2] == 0 and k_cache.shape[3] == q.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return (q if q.stride(-1) == 1 else q.contiguous()), out
