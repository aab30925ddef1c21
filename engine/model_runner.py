"""ModelRunner: owns the model, the KV cache and the decode graphs; a scheduler Batch in, logits out."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, BlockTableRows
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graph import DecodeGraphs, GraphCaptureStats, graph_batch_sizes, table_width
from engine.models.parallel import SINGLE, TensorParallel
from engine.scheduler import Batch
from engine.encoder_cache import EncoderCache
from engine.multimodal import MultimodalInputs
from engine.step_plan import ImagePiece, PromptLogprobSpan, StepPlan, padded_table

log = logging.getLogger("llm.engine")


@dataclass(frozen=True, slots=True)
class ModelOutput:
    """One step's logits: a row per sampling sequence, and the prompt-logprob positions when asked."""
    logits: torch.Tensor                        # [S, V] float32
    sample_rows: list[int]                      # the batch row of each logits row
    prompt_logits: torch.Tensor | None = None   # [P, V] float32, rows laid out by the spans
    prompt_logprob_spans: tuple[PromptLogprobSpan, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuStartup:
    """The GPU-only startup phases, for the startup log and the benchmarks."""
    autotune_seconds: float
    num_configs_tuned: int      # timed this start (0 with a warm cache)
    num_configs_loaded: int     # found in the cache file
    graphs: GraphCaptureStats | None


class ModelRunner:
    """Batch -> tensors -> model -> logits. Never mutates sequences (the scheduler owns them)."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device, max_model_len: int | None = None,
                 tp: TensorParallel = SINGLE):
        """max_model_len: eager decode rows get block tables of its width (table_width), as the graphs do;
        None: as wide as the batch's longest table. tp: this rank's place; its cache holds its KV heads."""
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        self.tp = tp
        shape = (num_blocks, block_size, tp.num_kv_heads(config), config.head_dim)
        self.kv_caches = [(_zeros(shape, kv_dtype, device), _zeros(shape, kv_dtype, device))
                          for _ in range(config.num_hidden_layers)]
        self.graphs: DecodeGraphs | None = None   # set by use_decode_graphs
        self._decode_width = table_width(max_model_len, block_size) if max_model_len else 0
        self._decode_rows_staged: BlockTableRows | None = None
        self.uses_mrope = bool(getattr(model, "uses_mrope", False))
        # vision models: image embeddings by content hash (engine/encoder_cache.py)
        self.encoder_cache = EncoderCache(model.encode_images) if config.is_vision_model else None

    @staticmethod
    def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype,
                           tp: TensorParallel = SINGLE) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * tp.num_kv_heads(config) * config.head_dim * elem

    # -- setup ----------------------------------------------------------------------------------

    def warm_up(self, config: EngineConfig, max_model_len: int,
                on_phase: Callable[[str], None] = lambda phase: None) -> GpuStartup | None:
        """On CUDA: settle every kernel's config (tuned once per GPU, cached; see kernels/autotune.py), then
        capture the decode graphs. None when the Triton ops are unavailable (the torch twins sync with the
        host, so they cannot be captured)."""
        from kernels import get_ops
        ops = get_ops("cuda")
        if not hasattr(ops, "warmup"):
            log.warning("Triton kernels unavailable: running the torch twins on CUDA, no autotune, no graphs")
            return None
        mc = self.config
        sizes = graph_batch_sizes(config.max_num_seqs, config.cuda_graph_max_batch, config.cuda_graph_sizes)
        shapes = ops.ModelShapes(
            hidden_size=mc.hidden_size, intermediate_size=self.tp.intermediate_size(mc),
            num_heads=self.tp.num_heads(mc), num_kv_heads=self.tp.num_kv_heads(mc), head_dim=mc.head_dim,
            block_size=self.block_size,
            max_model_len=max_model_len,
            # the tuning buckets cover every decode batch, graphs or not
            decode_batch_sizes=sizes or graph_batch_sizes(config.max_num_seqs),
            prefill_query_lens=(max(config.max_num_batched_tokens, self.block_size),),
            dtype=self.kv_caches[0][0].dtype)
        on_phase("tuning kernels" if config.autotune else "loading kernel configs")
        start = time.monotonic()
        tuner = ops.warmup(shapes, self.device, cache_dir=config.autotune_cache_dir,
                           skip_tuning=not config.autotune,
                           progress=lambda done, total, label: on_phase(f"tuning kernels {done}/{total}"))
        autotune_seconds = time.monotonic() - start
        torch.cuda.empty_cache()   # tuning scratch goes back before the graphs' pool is sized
        log.info("kernel configs: %d from cache, %d tuned in %.1fs", tuner.num_loaded, tuner.num_tuned,
                 autotune_seconds)
        stats = None
        # NOTE: graphs replay on rank 0 alone; the other ranks would have to replay theirs in step
        # NOTE: the graphs take a decode token's rotary position to be its index, which Qwen2-VL's is not
        if config.cuda_graphs and sizes and self.tp.size == 1 and not self.uses_mrope:
            on_phase("capturing CUDA graphs")
            stats = self.use_decode_graphs(sizes, max_model_len)
            log.info("captured %d decode graphs (batch %d..%d) in %.2fs holding %.0f MiB", len(sizes), sizes[0],
                     sizes[-1], stats.capture_seconds, stats.memory_bytes / 2**20)
        return GpuStartup(autotune_seconds, tuner.num_tuned, tuner.num_loaded, stats)

    def use_decode_graphs(self, batch_sizes: Sequence[int], max_model_len: int) -> GraphCaptureStats | None:
        """Run decode-only batches of up to max(batch_sizes) rows from static buffers padded to a bucket,
        captured as CUDA graphs on a GPU (elsewhere the same buffers and padding run eagerly)."""
        graphs = DecodeGraphs(self.model, self.kv_caches, batch_sizes, max_model_len, self.block_size, self.device)
        stats = graphs.capture() if self.device.type == "cuda" else None
        self.graphs = graphs
        return stats

    # -- one step -------------------------------------------------------------------------------

    def execute(self, batch: Batch) -> ModelOutput:
        """Run one scheduled batch: a decode graph when one fits it, else the model eagerly."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return ModelOutput(self.graphs.execute(batch), list(range(batch.num_seqs)))
        return self.execute_eager(batch)

    def execute_eager(self, batch: Batch) -> ModelOutput:
        return self.execute_plan(self.plan(batch))

    @torch.inference_mode()
    def execute_plan(self, plan: StepPlan) -> ModelOutput:
        """Run a plan and compute the logits rank 0 samples from."""
        hidden = self.forward(plan)
        dev = self.device
        # every token sampled (a decode-only step): the indices, increasing, one a row, are all of them
        picked = hidden if len(plan.logits_indices) == hidden.shape[0] else \
            hidden[torch.from_numpy(plan.logits_indices).to(dev)]
        logits = self.model.compute_logits(picked)
        prompt_logits = None
        if plan.prompt_logprob_spans:
            prompt_logits = self.model.compute_logits(hidden[torch.from_numpy(plan.prompt_logprob_indices).to(dev)])
        return ModelOutput(logits, list(plan.sample_rows), prompt_logits, plan.prompt_logprob_spans)

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        """The model over a plan: final hidden states [T, H]. The other tensor-parallel ranks run only
        this, in step with rank 0 (the all-reduces inside pair them up)."""
        dev = self.device
        meta = AttentionMetadata.for_batch(
            dev, plan.slot_mapping, torch.from_numpy(plan.decode_block_tables).to(dev),
            plan.decode_context_lens.tolist(), torch.from_numpy(plan.prefill_block_tables).to(dev),
            plan.prefill_query_lens.tolist(), plan.prefill_context_lens.tolist())
        mm = self._multimodal(plan) if plan.image_pieces or plan.mrope_positions is not None else None
        return self.model(torch.from_numpy(plan.input_ids).to(dev), torch.from_numpy(plan.positions).to(dev),
                          self.kv_caches, meta, **({"mm": mm} if mm is not None else {}))

    def _multimodal(self, plan: StepPlan) -> MultimodalInputs:
        """The step's image embeddings (the images it reaches encoded in one batch, unless cached) and
        rotary positions."""
        dev = self.device
        indices, embeds = [], []
        if plan.image_pieces:
            encoded = self.encoder_cache.embeddings([p.image for p in plan.image_pieces])
            for p in plan.image_pieces:
                indices.append(torch.arange(p.flat_start, p.flat_start + p.count))
                embeds.append(encoded[p.image.content_hash][p.image_start:p.image_start + p.count])
        hidden = self.config.hidden_size
        return MultimodalInputs(
            torch.cat(indices).to(dev) if indices else torch.zeros(0, dtype=torch.int64, device=dev),
            torch.cat(embeds) if embeds else torch.zeros(0, hidden, device=dev),
            None if plan.mrope_positions is None else torch.from_numpy(plan.mrope_positions).to(dev))

    def _decode_rows(self, num_rows: int) -> BlockTableRows:
        """The staged decode-row tables, at least num_rows rows of the fixed width (see __init__)."""
        if self._decode_rows_staged is None or self._decode_rows_staged.array.shape[0] < num_rows:
            rows = max(num_rows, 2 * self._decode_rows_staged.array.shape[0] if self._decode_rows_staged else 8)
            self._decode_rows_staged = BlockTableRows(np.zeros((rows, self._decode_width), dtype=np.int64))
        return self._decode_rows_staged

    def plan(self, batch: Batch) -> StepPlan:
        """Flatten a Batch (decode rows first, then prefill rows) into model inputs."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        logits_indices: list[int] = []
        sample_rows: list[int] = []
        decode_lens = []
        prefill_tables, prefill_query_lens, prefill_lens = [], [], []
        spans: list[PromptLogprobSpan] = []
        span_indices: list[int] = []
        staged = self._decode_rows(batch.num_decodes) if self._decode_width and batch.num_decodes else None
        image_pieces: list[ImagePiece] = []
        mrope: list[np.ndarray] | None = [] if self.uses_mrope else None
        decode_tables, decode_slots = [], []
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
                spans.append(PromptLogprobSpan(row, len(span_indices), wanted))
                span_indices.extend(range(first, first + wanted))
            if row < batch.num_decodes:   # one token: gathered for all decode rows at once below
                assert s.num_tokens == 1, s
                if staged is not None:
                    staged.write(row, table)
                else:
                    decode_slots.append(table[s.start // bs] * bs + s.start % bs)
                    decode_tables.append(table)
                decode_lens.append(end)
                if mrope is not None:
                    mrope.append(_mrope_rows(seq, s.start, end))
            else:
                pos = np.arange(s.start, end, dtype=np.int64)
                positions.append(pos)
                slots.append(np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs)
                prefill_tables.append(table)
                prefill_query_lens.append(s.num_tokens)
                prefill_lens.append(end)
                for image in seq.images:
                    lo, hi = max(image.offset, s.start), min(image.end, end)
                    if lo < hi:
                        image_pieces.append(ImagePiece(first + lo - s.start, image, lo - image.offset, hi - lo))
                if mrope is not None:
                    mrope.append(_mrope_rows(seq, s.start, end))
            if s.sample:
                logits_indices.append(len(input_ids) - 1)
                sample_rows.append(row)
        nd = batch.num_decodes
        if nd:
            decode_pos = np.asarray(decode_lens, dtype=np.int64) - 1
            positions.insert(0, decode_pos)
            if staged is not None:
                decode_slots = staged.array[np.arange(nd), decode_pos // bs] * bs + decode_pos % bs
                # NOTE: every eager decode step has the same table width (max_model_len's), so the Triton
                # decode kernel's split count and its tuned config's key do not change with the batch
                decode_tables = staged.array[:nd].copy()   # the staged rows are rewritten next step
            slots.insert(0, np.asarray(decode_slots, dtype=np.int64))
        if isinstance(decode_tables, list):
            decode_tables = padded_table(decode_tables)
        return StepPlan(
            input_ids=np.asarray(input_ids, dtype=np.int64),
            positions=_concat(positions),
            slot_mapping=_concat(slots),
            decode_block_tables=decode_tables,
            decode_context_lens=np.asarray(decode_lens, dtype=np.int64),
            prefill_block_tables=padded_table(prefill_tables),
            prefill_query_lens=np.asarray(prefill_query_lens, dtype=np.int64),
            prefill_context_lens=np.asarray(prefill_lens, dtype=np.int64),
            logits_indices=np.asarray(logits_indices, dtype=np.int64),
            sample_rows=tuple(sample_rows),
            prompt_logprob_spans=tuple(spans),
            prompt_logprob_indices=np.asarray(span_indices, dtype=np.int64),
            image_pieces=tuple(image_pieces),
            mrope_positions=np.concatenate(mrope, axis=1) if mrope else None)


def _mrope_rows(seq, start: int, end: int) -> np.ndarray:
    """[3, end - start] Qwen2-VL rotary positions of tokens [start, end): the prompt's as the core computed
    them, then i + delta on all three for a token i past the prompt."""
    num_prompt = seq.num_prompt_tokens
    parts = []
    if start < num_prompt:
        parts.append(seq.mrope_positions[:, start:min(end, num_prompt)])
    if end > num_prompt:
        parts.append(np.broadcast_to(np.arange(max(start, num_prompt), end, dtype=np.int64) + seq.mrope_delta,
                                     (3, end - max(start, num_prompt))))
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache tensor. On the CPU from calloc'd memory (numpy), whose pages the OS zeroes
    on first touch: torch.zeros would write all of a 2 GiB cache at startup (1-4 s on the dev machine).
    NOTE: zeros, not garbage: the torch attention twins read whole blocks and mask by weight, and a
    NaN bit pattern times a zero weight would still be NaN."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)
