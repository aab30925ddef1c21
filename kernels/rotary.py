"""Neox (rotate-half) rotary embedding for q and k in one launch: one program per token, all heads at once."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import autotune
from kernels.autotune import Config, TuneJob, TuneKey

CANDIDATES: tuple[Config, ...] = tuple({"num_warps": w} for w in (4, 1, 2, 8))


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """float32 x rounded (to nearest, ties to even) to dtype's precision, kept in float32."""
    if dtype == tl.bfloat16:
        # by its bits: Triton's interpreter truncates a float32 -> bfloat16 cast (the GPU rounds), and the
        # tests compare the kernel with the twin bit for bit in both
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, token, stride_t, stride_h, num_heads, half, cos, sin,
                  BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (cols < half)
    src = src_ptr + token * stride_t + heads * stride_h + cols
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    # NOTE: rounded as HF Llama does it (and the twin): cos/sin cast to the input dtype, then each product
    # and the sum rounded to it; in float32 the casts are no-ops
    dtype = dst_ptr.dtype.element_ty
    cos = _round_to(cos, dtype)
    sin = _round_to(sin, dtype)
    x1_cos, x2_sin = _round_to(x1 * cos, dtype), _round_to(x2 * sin, dtype)
    x2_cos, x1_sin = _round_to(x2 * cos, dtype), _round_to(x1 * sin, dtype)
    # the output is contiguous [T, heads, 2 * half]; the values are representable, so the casts are exact
    dst = dst_ptr + token * num_heads * 2 * half + heads * 2 * half + cols
    tl.store(dst, _round_to(x1_cos - x2_sin, dtype).to(dtype), mask=mask)
    tl.store(dst + half, _round_to(x2_cos + x1_sin, dtype).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr,             # [T, Hq, D], [T, Hk, D]: any token/head strides, unit stride within a head
    q_out_ptr, k_out_ptr,     # same shapes, contiguous
    positions_ptr,            # [T] int
    cos_sin_ptr,              # [max_pos, D] float32: cos in [:, :D/2], sin in [:, D/2:]
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_q_heads, num_k_heads, half,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + cols, mask=cols < half, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + cols, mask=cols < half, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, token, stride_qt, stride_qh, num_q_heads, half, cos, sin,
                  BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, token, stride_kt, stride_kh, num_k_heads, half, cos, sin,
                  BLOCK_KH, BLOCK_HALF)


def _key(num_heads: int, head_dim: int, dtype: torch.dtype) -> TuneKey:
    return TuneKey("rotary", f"h{num_heads}_d{head_dim}", str(dtype).removeprefix("torch."))


def _launch(q, k, positions, cos_sin_cache, q_out, k_out, num_warps: int) -> None:
    t, num_q_heads, d = q.shape
    num_k_heads = k.shape[1]
    _rotary_kernel[(t,)](
        q, k, q_out, k_out, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        num_q_heads, num_k_heads, d // 2,
        BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(num_k_heads),
        BLOCK_HALF=triton.next_power_of_2(d // 2), num_warps=num_warps)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as kernels.reference.rotary_embedding: new q, k in their own dtypes."""
    assert q.shape[-1] % 2 == 0 and cos_sin_cache.shape[-1] == q.shape[-1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0] == 0:
        return q_out, k_out
    config = autotune.chosen(_key(q.shape[1], q.shape[2], q.dtype), CANDIDATES[0])
    _launch(q, k, positions, cos_sin_cache, q_out, k_out, config["num_warps"])
    return q_out, k_out


def tune_jobs(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> list[TuneJob]:
    def make():   # built only if the job is timed (autotune.lazy)
        q = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device)
        k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
        return (q, k, torch.arange(num_tokens, device=device), torch.randn(num_tokens, head_dim, device=device),
                torch.empty_like(q), torch.empty_like(k))
    inputs = autotune.lazy(make)
    return [TuneJob(_key(num_heads, head_dim, dtype), CANDIDATES,
                    lambda c: _launch(*inputs(), c["num_warps"]))]
