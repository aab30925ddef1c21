"""The CUDA op set: Triton kernels with the same names and signatures as kernels.reference, plus warm-up."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import activation, decode_attention, prefill_attention, rms_norm as _rms_norm, rotary
from kernels.activation import silu_and_mul
from kernels.autotune import Autotuner, ProgressFn, TuneJob
from kernels.decode_attention import paged_decode_attention
from kernels.kv_store import store_kv
from kernels.prefill_attention import paged_prefill_attention
from kernels.rms_norm import rms_norm
from kernels.rotary import rotary_embedding
from kernels.sampling import sample_top_k_top_p

__all__ = ["rms_norm", "rotary_embedding", "silu_and_mul", "store_kv", "paged_decode_attention",
           "paged_prefill_attention", "sample_top_k_top_p", "ModelShapes", "tune_jobs", "warmup"]


@dataclass(frozen=True, slots=True)
class ModelShapes:
    """What the kernels will see while serving one model: enough to build every tuning case."""
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    max_model_len: int
    decode_batch_sizes: tuple[int, ...]     # the CUDA-graph buckets (each is a decode shape class)
    prefill_query_lens: tuple[int, ...]     # e.g. (max_num_batched_tokens,)
    dtype: torch.dtype


def tune_jobs(shapes: ModelShapes, device: torch.device) -> list[TuneJob]:
    """Every (kernel, shape bucket) the model will hit, with its candidates and a launch to time."""
    s = shapes
    max_batch = max(s.decode_batch_sizes)
    jobs: list[TuneJob] = []
    jobs += _rms_norm.tune_jobs(max_batch, s.hidden_size, s.dtype, device)
    jobs += rotary.tune_jobs(max_batch, s.num_heads, s.num_kv_heads, s.head_dim, s.dtype, device)
    jobs += activation.tune_jobs(max_batch, s.intermediate_size, s.dtype, device)
    jobs += decode_attention.tune_jobs(list(s.decode_batch_sizes), s.num_heads, s.num_kv_heads, s.head_dim,
                                       s.block_size, s.max_model_len, s.dtype, device)
    jobs += prefill_attention.tune_jobs(list(s.prefill_query_lens), s.num_heads, s.num_kv_heads, s.head_dim,
                                        s.block_size, s.dtype, device)
    return jobs


def warmup(shapes: ModelShapes, device: torch.device, *, cache_dir: str | None = None,
           skip_tuning: bool = False, progress: ProgressFn | None = None,
           jobs: Sequence[TuneJob] | None = None) -> Autotuner:
    """Resolve every kernel config (cache, else tune, else heuristics) before any CUDA graph is captured.

    Returns the tuner so the caller can report how many entries were loaded and how many were tuned.
    """
    tuner = Autotuner(cache_dir, skip_tuning=skip_tuning, progress=progress)
    tuner.run(list(jobs) if jobs is not None else tune_jobs(shapes, device))
    torch.cuda.synchronize(device)
    return tuner

