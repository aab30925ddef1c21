"""Attention over the paged KV cache: metadata built by the runner, consumed by every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token's K/V goes and what each sequence attends to, for one forward pass.

    Tokens are packed decode rows first (one token each), then prefill/extend rows.
    """
    slot_mapping: torch.Tensor             # [T] int64 cache slot per token; -1 = padded row
    num_decode_tokens: int                 # first num_decode_tokens tokens are decode rows
    decode_block_tables: torch.Tensor      # [Bd, M] int64
    decode_context_lens: torch.Tensor      # [Bd] int64, includes the current token
    max_decode_context_len: int
    prefill_cu_seqlens_q: torch.Tensor     # [Bp+1] int64 offsets into the prefill part
    prefill_context_lens: torch.Tensor     # [Bp] int64, includes the new tokens
    prefill_block_tables: torch.Tensor     # [Bp, M] int64
    max_prefill_query_len: int
    max_prefill_context_len: int


class PagedAttention:
    """Stores new K/V into one layer's cache and attends; ops are the Triton kernels or torch twins."""

    def __init__(self, ops, scale: float):
        self.ops = ops
        self.scale = scale

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, h, D], k/v: [T, kvh, D] -> [T, h, D]."""
        self.ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if nd == q.shape[0]:
            return self.ops.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                   meta.decode_context_lens, self.scale,
                                                   meta.max_decode_context_len)
        prefill = self.ops.paged_prefill_attention(
            q[nd:], k_cache, v_cache, meta.prefill_cu_seqlens_q, meta.prefill_context_lens,
            meta.prefill_block_tables, self.scale, meta.max_prefill_query_len,
            meta.max_prefill_context_len)
        if nd == 0:
            return prefill
        decode = self.ops.paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                                 meta.decode_context_lens, self.scale,
                                                 meta.max_decode_context_len)
        return torch.cat([decode, prefill], dim=0)
