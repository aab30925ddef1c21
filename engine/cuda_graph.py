"""Decode steps captured as CUDA graphs per batch-size bucket, replayed from static input buffers."""
from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, BlockTableRows

SMALL_SIZES = (1, 2, 4, 8)   # below the step every size is worth a graph: padding 1 -> 8 would triple the work
SIZE_STEP = 8                # then 16, 24, 32, ...: at most 7 padded rows per decode step


def graph_batch_sizes(max_num_seqs: int, max_batch: int | None = None,
                      sizes: Sequence[int] = ()) -> tuple[int, ...]:
    """The batch sizes to capture, ascending: `sizes` when given, else 1, 2, 4, 8, 16, 24, ... up to the cap
    (min of max_num_seqs and max_batch), with the cap itself last so every batch up to it has a bucket."""
    cap = min(max_num_seqs, max_batch) if max_batch is not None else max_num_seqs
    if cap < 1:
        return ()
    if sizes:
        return tuple(sorted({s for s in sizes if 1 <= s <= cap}))
    grid = [s for s in SMALL_SIZES if s <= cap] + list(range(2 * SIZE_STEP, cap + 1, SIZE_STEP))
    if grid[-1] != cap:
        grid.append(cap)
    return tuple(grid)


def bucket_for(num_seqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size that holds num_seqs rows (sizes ascending); None: run eagerly."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def table_width(max_model_len: int, block_size: int) -> int:
    """Block-table columns every graph is captured with: enough for the longest allowed sequence."""
    return -(-max_model_len // block_size)


class DecodeBuffers:
    """The static inputs every decode graph reads, sized for the largest bucket.

    The four per-row vectors live in one [4, max_batch] tensor and the tables in a [max_batch, width] one,
    so a step costs two host-to-device copies from pinned staging buffers. Padded rows get slot -1 (the KV
    store skips them) and context length 0 (the decode kernel writes zeros for them).
    """

    def __init__(self, max_batch: int, width: int, block_size: int, device: torch.device):
        self.max_batch = max_batch
        self.width = width
        self.block_size = block_size
        self.device = device
        self.header = torch.zeros((4, max_batch), dtype=torch.int64, device=device)
        self.header[2].fill_(-1)
        self.block_tables = torch.zeros((max_batch, width), dtype=torch.int64, device=device)
        self._no_prefill = torch.zeros(1, dtype=torch.int64, device=device)   # cu_seqlens of zero prefill rows
        pin = device.type == "cuda"
        self._host_header = torch.zeros((4, max_batch), dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros((max_batch, width), dtype=torch.int64, pin_memory=pin)
        self._rows = BlockTableRows(self._host_tables.numpy())
        # NOTE: the staging buffers are rewritten only after the previous step's copies have finished
        self._copied = torch.cuda.Event() if pin else None

    @property
    def nbytes(self) -> int:
        return (self.header.numel() + self.block_tables.numel()) * 8

    def meta(self, batch_size: int) -> AttentionMetadata:
        """Metadata over the first batch_size rows; what a graph of that size is captured with."""
        # max_context_len is an upper bound: the Triton kernel ignores it, the torch twin gathers this many
        return AttentionMetadata.for_decode(self.header[2, :batch_size], self.block_tables[:batch_size],
                                            self.header[3, :batch_size], self.width * self.block_size,
                                            self._no_prefill)

    def fill(self, batch, batch_size: int) -> None:
        """Write a decode-only batch into rows [0, n) and padding into rows [n, batch_size)."""
        n = len(batch.seqs)
        assert batch.is_decode_only and n <= batch_size <= self.max_batch, (n, batch_size)
        if self._copied is not None:
            self._copied.synchronize()
        header, tables = self._host_header.numpy(), self._host_tables.numpy()
        bs = self.block_size
        ids, positions = [], []
        for i, s in enumerate(batch.seqs):
            seq, pos = s.seq, s.start
            assert len(seq.block_table) * bs > pos, "block table must cover the scheduled token"
            self._rows.write(i, seq.block_table)   # only the blocks appended since the row's last step
            ids.append(seq.all_token_ids[pos])
            positions.append(pos)
        header[0, :n] = ids
        header[1, :n] = positions
        pos = header[1, :n]
        header[2, :n] = tables[np.arange(n), pos // bs] * bs + pos % bs
        header[3, :n] = pos + 1
        header[:2, n:batch_size] = 0
        header[2, n:batch_size] = -1
        header[3, n:batch_size] = 0
        self.header.copy_(self._host_header, non_blocking=True)
        self.block_tables[:batch_size].copy_(self._host_tables[:batch_size], non_blocking=True)
        if self._copied is not None:
            self._copied.record()


@dataclass(frozen=True, slots=True)
class GraphCaptureStats:
    """What capture cost, reported at startup."""
    batch_sizes: tuple[int, ...]
    capture_seconds: float
    memory_bytes: int          # device memory held by the graphs' pool and the static buffers


class DecodeGraphs:
    """Decode-only batches padded to a bucket and replayed from that bucket's graph (eager until captured).

    Each graph covers the whole step from token ids to float32 logits, so a replay is one launch.
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 batch_sizes: Sequence[int], max_model_len: int, block_size: int, device: torch.device):
        assert batch_sizes and list(batch_sizes) == sorted(set(batch_sizes)), batch_sizes
        self.model = model
        self.kv_caches = kv_caches
        self.batch_sizes = tuple(batch_sizes)
        self.buffers = DecodeBuffers(self.batch_sizes[-1], table_width(max_model_len, block_size),
                                     block_size, device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None   # [max_batch, V] float32, written by every graph

    def can_run(self, batch) -> bool:
        return batch.is_decode_only and 0 < batch.num_seqs <= self.batch_sizes[-1]

    def bucket(self, batch) -> int:
        """The captured batch size a decode-only batch runs as (its rows, then padding)."""
        size = bucket_for(batch.num_seqs, self.batch_sizes)
        assert size is not None and batch.is_decode_only, (batch.num_seqs, self.batch_sizes)
        return size

    def execute(self, batch) -> torch.Tensor:
        """Logits [num_seqs, V] float32 of a decode-only batch: buffers filled, its bucket replayed."""
        size = self.bucket(batch)
        self.buffers.fill(batch, size)
        return self.run(size)[: batch.num_seqs]

    def run(self, batch_size: int) -> torch.Tensor:
        """Logits [batch_size, V] float32 for the rows in the buffers: a replay, or eagerly before capture."""
        graph = self._graphs.get(batch_size)
        if graph is None:
            return self._forward(batch_size)
        graph.replay()
        return self._logits[:batch_size]

    def _forward(self, batch_size: int) -> torch.Tensor:
        b = self.buffers
        hidden = self.model(b.header[0, :batch_size], b.header[1, :batch_size], self.kv_caches,
                            b.meta(batch_size))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> GraphCaptureStats:
        """Capture every bucket, largest first, into one memory pool (smaller graphs reuse its blocks)."""
        device = self.buffers.device
        torch.cuda.synchronize(device)
        free_before = torch.cuda.mem_get_info(device)[0]
        start = time.monotonic()
        # NOTE: one output buffer outside the pool: each graph's own logits would stay allocated, and
        # 36 buckets x [B, V] float32 is gigabytes for a 128k vocabulary
        self._logits = torch.empty_like(self._forward(self.batch_sizes[-1]))
        pool = None
        for size in reversed(self.batch_sizes):
            self._forward(size)   # warm-up outside capture: kernel compiles, cuBLAS handles and workspaces
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[:size].copy_(self._forward(size))
            if pool is None:
                pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize(device)
        seconds = time.monotonic() - start
        torch.cuda.empty_cache()   # warm-up leftovers are not the graphs' memory
        used = max(0, free_before - torch.cuda.mem_get_info(device)[0]) + self.buffers.nbytes
        return GraphCaptureStats(self.batch_sizes, seconds, used)
