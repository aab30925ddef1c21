"""Attention over the paged KV cache: metadata built by the runner, consumed by every layer."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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

    @classmethod
    def for_batch(cls, device: torch.device, slot_mapping: list[int] | np.ndarray,
                  decode_block_tables: list[list[int]] | torch.Tensor,
                  decode_context_lens: list[int], prefill_block_tables: list[list[int]] | torch.Tensor,
                  prefill_query_lens: list[int], prefill_context_lens: list[int]) -> "AttentionMetadata":
        """From plain lists, one entry per row: decode rows (one token each), then prefill rows.
        Either block tables may be a ready [rows, M] int64 tensor on `device` (the runner's padded rows)."""
        cu = [0]
        for n in prefill_query_lens:
            cu.append(cu[-1] + n)
        if not isinstance(decode_block_tables, torch.Tensor):
            decode_block_tables = _table(decode_block_tables, device)
        return cls(
            slot_mapping=_ints(slot_mapping, device), num_decode_tokens=len(decode_context_lens),
            decode_block_tables=decode_block_tables,
            decode_context_lens=_ints(decode_context_lens, device),
            max_decode_context_len=max(decode_context_lens, default=0),
            prefill_cu_seqlens_q=_ints(cu, device), prefill_context_lens=_ints(prefill_context_lens, device),
            prefill_block_tables=prefill_block_tables if isinstance(prefill_block_tables, torch.Tensor)
            else _table(prefill_block_tables, device),
            max_prefill_query_len=max(prefill_query_lens, default=0),
            max_prefill_context_len=max(prefill_context_lens, default=0))

    @classmethod
    def for_prefill(cls, device: torch.device, slot_mapping: list[int], block_tables: list[list[int]],
                    query_lens: list[int], context_lens: list[int]) -> "AttentionMetadata":
        """Prefill (or extend) rows only."""
        return cls.for_batch(device, slot_mapping, [], [], block_tables, query_lens, context_lens)

    @classmethod
    def for_decode(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                   max_context_len: int, no_prefill: torch.Tensor | None = None) -> "AttentionMetadata":
        """Decode rows only, from tensors already on the device (the decode graphs' static buffers).
        no_prefill: a [1] zero tensor to use as the empty prefill part's offsets (made when not given)."""
        if no_prefill is None:
            no_prefill = torch.zeros(1, dtype=torch.int64, device=context_lens.device)
        return cls(
            slot_mapping=slot_mapping, num_decode_tokens=block_tables.shape[0], decode_block_tables=block_tables,
            decode_context_lens=context_lens, max_decode_context_len=max_context_len,
            prefill_cu_seqlens_q=no_prefill, prefill_context_lens=no_prefill[:0],
            prefill_block_tables=block_tables[:0], max_prefill_query_len=0, max_prefill_context_len=0)


def _ints(values: list[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        return torch.from_numpy(values.astype(np.int64, copy=False)).to(device)
    return torch.tensor(values, dtype=torch.int64, device=device)


def _table(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """Block tables padded with block 0 to the widest row: [rows, max(1, width)] int64."""
    width = max((len(t) for t in tables), default=1)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables] or [[0]],
                        dtype=torch.int64, device=device)[: len(tables)]


class BlockTableRows:
    """Block tables staged row by row in a [rows, width] int64 host array, rewritten incrementally: a row
    that holds the same table as at its last write gets only the blocks appended since.

    NOTE: a sequence's table list only ever grows (append/extend); the block manager gives a freed sequence
    a new list rather than clearing it in place, so `is` on the list object tells a grown table from a new
    one. Columns past a row's table keep stale ids: attention reads no position past a context length.
    """

    def __init__(self, array: np.ndarray):
        assert array.ndim == 2 and array.dtype == np.int64, (array.shape, array.dtype)
        self.array = array
        self._tables: list[list[int] | None] = [None] * array.shape[0]   # the list each row last copied
        self._lens = [0] * array.shape[0]                                # how much of it

    @property
    def width(self) -> int:
        return self.array.shape[1]

    def write(self, row: int, table: list[int]) -> None:
        n = len(table)
        assert n <= self.array.shape[1], "a block table is wider than max_model_len allows"
        start = self._lens[row] if self._tables[row] is table else 0
        assert n >= start, "block tables only grow (a freed sequence gets a new list)"
        if n > start:
            self.array[row, start:n] = table[start:] if start else table
        self._tables[row] = table
        self._lens[row] = n


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
