"""ModelRunner: owns the model and the KV cache; turns a scheduler Batch into tensors, logits, token ids."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.config import ModelConfig


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    input_ids: torch.Tensor        # [T]
    positions: torch.Tensor        # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor   # [S] rows of the hidden states to sample from (one per sampling seq)
    sample_rows: list[int]         # batch row index of each sampling seq
    # Prompt logprobs: (batch row, first hidden row, number of positions) for rows that asked for them;
    # their hidden rows follow the S sampling rows in the logits.
    prompt_logprob_spans: list[tuple[int, int, int]]
    prompt_logprob_indices: torch.Tensor
    graph_batch_size: int = 0      # > 0: inputs sit in the decode graphs' buffers; replay this bucket


class ModelRunner:
    """Batch -> tensors -> model -> logits. Never mutates requests (the scheduler owns them)."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.kv_caches = [(_zeros(shape, dtype, device), _zeros(shape, dtype, device))
                          for _ in range(config.num_hidden_layers)]
        self.graphs = None  # engine.cuda_graph.DecodeGraphs, attached after capture on CUDA

    @staticmethod
    def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * elem

    def prepare(self, batch) -> PreparedBatch:
        """Flatten a Batch (decode rows first, then prefill rows) into model inputs."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.prepare(batch)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sample_rows: list[int] = []
        decode_tables, decode_lens, prefill_tables, prefill_lens = [], [], [], []
        spans: list[tuple[int, int, int]] = []
        span_indices: list[int] = []
        cu = [0]
        num_decode_tokens = 0
        max_q = 0
        for row, s in enumerate(batch.seqs):
            seq = s.seq
            end = s.start + s.num_tokens
            tokens = seq.all_token_ids[s.start:end]
            assert len(tokens) == s.num_tokens, "scheduled tokens must already be known"
            table = seq.block_table
            assert len(table) * bs >= end, "block table must cover the scheduled tokens"
            first = len(input_ids)
            input_ids.extend(tokens)
            # Positions p < num_prompt - 1 predict a prompt token: their logits give prompt logprobs.
            wanted = min(end, seq.num_prompt_tokens - 1) - s.start
            if seq.params.prompt_logprobs is not None and wanted > 0:
                spans.append((row, len(span_indices), wanted))
                span_indices.extend(range(first, first + wanted))
            pos = range(s.start, end)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if s.num_tokens == 1 and not prefill_lens:
                num_decode_tokens += 1
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                prefill_tables.append(table)
                prefill_lens.append(end)
                cu.append(cu[-1] + s.num_tokens)
                max_q = max(max_q, s.num_tokens)
            if s.sample:
                logits_indices.append(len(input_ids) - 1)
                sample_rows.append(row)
        dev = self.device

        def table_tensor(tables: list[list[int]]) -> torch.Tensor:
            width = max((len(t) for t in tables), default=1)
            return torch.tensor([t + [0] * (width - len(t)) for t in tables] or [[0]],
                                dtype=torch.int64, device=dev)[: len(tables)]

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode_tokens=num_decode_tokens,
            decode_block_tables=table_tensor(decode_tables),
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.int64, device=dev),
            max_decode_context_len=max(decode_lens, default=0),
            prefill_cu_seqlens_q=torch.tensor(cu, dtype=torch.int64, device=dev),
            prefill_context_lens=torch.tensor(prefill_lens, dtype=torch.int64, device=dev),
            prefill_block_tables=table_tensor(prefill_tables),
            max_prefill_query_len=max_q,
            max_prefill_context_len=max(prefill_lens, default=0),
        )
        return PreparedBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=dev),
            sample_rows=sample_rows,
            prompt_logprob_spans=spans,
            prompt_logprob_indices=torch.tensor(span_indices, dtype=torch.int64, device=dev))

    @torch.inference_mode()
    def forward(self, prepared: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model: logits [S, V] float32 for the sampling rows, and for the prompt-logprob
        positions (None when no row asked for them)."""
        if prepared.graph_batch_size:
            return self.graphs.run(prepared.graph_batch_size)[: len(prepared.sample_rows)], None
        hidden = self.model(prepared.input_ids, prepared.positions, self.kv_caches, prepared.meta)
        logits = self.model.compute_logits(hidden[prepared.logits_indices])
        if not prepared.prompt_logprob_spans:
            return logits, None
        return logits, self.model.compute_logits(hidden[prepared.prompt_logprob_indices])


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache tensor. On the CPU from calloc'd memory (numpy), whose pages the OS zeroes
    on first touch: torch.zeros would write all of a 2 GiB cache at startup (1-4 s on the dev machine).
    NOTE: zeros, not garbage: the torch attention twins read whole blocks and mask by weight, and a
    NaN bit pattern times a zero weight would still be NaN."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)
