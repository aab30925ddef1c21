"""The CPU op set: the torch twins of kernels/reference.py, with C kernels (kernels/cpu_kernels.c) in
place of those whose torch form costs more in per-op overhead than in arithmetic at decode batch
sizes: paged decode attention (a gather of every sequence's K/V and a padded SDPA per layer), RMSNorm,
rotary embedding and SiLU-and-mul (several small ops each, per layer).
Same names and signatures as reference; float32 only (other dtypes and layouts take the twins)."""
from __future__ import annotations

import ctypes

import torch

from kernels import reference
from kernels.reference import paged_prefill_attention, sample_top_k_top_p, store_kv  # noqa: F401


def _library() -> ctypes.CDLL | None:
    from kernels.cpu_build import load_library
    return load_library()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    lib = _library()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or weight.dtype != torch.float32:
        return reference.rms_norm(x, weight, eps, residual)
    x = x.contiguous()
    out = torch.empty_like(x)
    residual_out = None
    if residual is not None:
        residual = residual.contiguous()
        residual_out = torch.empty_like(x)
    lib.llm_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
                     x.shape[0], x.shape[1], out.data_ptr(), None if residual_out is None else residual_out.data_ptr())
    return out, residual_out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None) -> torch.Tensor:
    lib = _library()
    if lib is None or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                max_context_len)
    b, num_heads, d = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    if b:
        lib.llm_paged_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                       tables.shape[1], lens.data_ptr(), b, num_heads, num_kv_heads, d,
                                       block_size, scale, out.data_ptr())
    return out


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _library()
    t, num_heads, d = q.shape
    num_kv_heads = k.shape[1]
    # q and k are usually views into the fused qkv rows: heads contiguous inside a row, rows strided.
    if (lib is None or q.dtype != torch.float32 or k.dtype != torch.float32 or cos_sin_cache.dtype != torch.float32
            or q.stride()[1:] != (d, 1) or k.stride()[1:] != (d, 1) or d % 2):
        return reference.rotary_embedding(q, k, positions, cos_sin_cache)
    cos_sin = cos_sin_cache.contiguous()
    pos = positions.to(torch.int64).contiguous()
    q_out, k_out = q.new_empty(q.shape), k.new_empty(k.shape)
    if t:
        lib.llm_rotary_embedding(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), pos.data_ptr(),
                                 cos_sin.data_ptr(), t, num_heads, num_kv_heads, d, q_out.data_ptr(),
                                 k_out.data_ptr())
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    lib = _library()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2:
        return reference.silu_and_mul(x)
    x = x.contiguous()
    out = x.new_empty((x.shape[0], x.shape[1] // 2))
    lib.llm_silu_and_mul(x.data_ptr(), x.shape[0], x.shape[1] // 2, out.data_ptr())
    return out
