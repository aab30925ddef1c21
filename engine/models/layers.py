"""Shared decoder layers for the Llama family: RMSNorm, rotary, fused-QKV attention, fused gate/up MLP."""
from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, PagedAttention
from engine.config import ModelConfig, RopeScaling
from engine.models.parallel import SINGLE, TensorParallel
from kernels.cpu_quant import quant_matmul


# Up to this many rows a projection with packed quantized weights runs the quantized CPU kernel; more
# rows (prefill chunks, big decode batches) run float32 sgemm where the loader kept float32 copies. Measured
# on the 2-core dev CPU (Zen 3, AVX2; scripts/bench_quant_matmul.py, 2 threads, Q4_1), one layer's four
# projections (qkv, o, gate_up, down) at M rows, packed kernel against sgemm on the float copies:
# 32 rows 2.6 ms vs 2.7, 64 rows 5.3 vs 4.9, 128 rows 10.4 vs 8.8 (15.1 before the kernel decoded each tile
# once for big batches), 512 rows 48 vs 34 (65 before). So with float copies the crossover stays near 64;
# without them (cpu_float_copies=False) every batch runs the packed kernel, at ~1.2x sgemm's time at 128 rows.
# NOTE: the kernel computes each row alike at any batch size (its big-batch path included), so decode
# batches up to this size give a sequence the same numbers whatever its batch mates.
QUANT_MAX_ROWS = 64


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """x @ W^T (+ b) for an nn.Linear (or a tied nn.Embedding as the LM head): the quantized CPU kernel
    where the loader packed W (layer.packed) and the batch is small or no float32 copy was kept, float32
    weights otherwise. The packed layout picks the kernel: float32 activations, or int8-quantized ones where
    the loader repacked for them (EngineConfig.cpu_quantized_activations)."""
    # F.linear on the weights directly: nn.Module.__call__ costs microseconds per call, per layer.
    packed, bias = getattr(layer, "packed", None), getattr(layer, "bias", None)
    if packed is not None and (x.shape[0] <= QUANT_MAX_ROWS or layer.weight is None):  # None: packed only
        out = quant_matmul(x, packed)
        return out if bias is None else out.add_(bias)
    return F.linear(x, layer.weight, bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: ModuleType):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        out, residual_out = self.ops.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, residual_out)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [D/2] in float32, computed exactly as HF does so greedy outputs match."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None or scaling.rope_type == "dynamic":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: low frequencies slowed by `factor`, high ones kept, a smooth blend in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin_cache(head_dim: int, theta: float, scaling: RopeScaling | None,
                       max_positions: int, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """[max_positions, D] float32: cos(pos * inv_freq) then sin(pos * inv_freq).

    freq_factors: per-frequency divisors [D/2] (GGUF's rope_freqs.weight), applied instead of scaling.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float()
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


class Attention(nn.Module):
    """Self-attention over this rank's heads: qkv_proj column-parallel, o_proj row-parallel (one all-reduce)."""

    def __init__(self, config: ModelConfig, ops: ModuleType, tp: TensorParallel = SINGLE):
        super().__init__()
        self.num_heads = tp.num_heads(config)
        self.num_kv_heads = tp.num_kv_heads(config)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None
        self.ops = ops
        self.tp = tp
        self.attn = PagedAttention(ops, scale=self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, cos_sin_cache: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = linear(x, self.qkv_proj)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm.forward(q.reshape(-1, self.head_dim)).view(t, self.num_heads, self.head_dim)
            k = self.k_norm.forward(k.reshape(-1, self.head_dim)).view(t, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rotary_embedding(q, k, positions, cos_sin_cache)
        out = self.attn(q, k, v, kv_cache[0], kv_cache[1], meta)
        return self.tp.all_reduce(linear(out.reshape(t, self.q_size), self.o_proj))


class MLP(nn.Module):
    """SwiGLU over this rank's share: gate_up_proj column-parallel, down_proj row-parallel (one all-reduce)."""

    def __init__(self, config: ModelConfig, ops: ModuleType, tp: TensorParallel = SINGLE):
        super().__init__()
        intermediate = tp.intermediate_size(config)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, config.hidden_size, bias=False)
        self.ops = ops
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(linear(self.ops.silu_and_mul(linear(x, self.gate_up_proj)), self.down_proj))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, ops: ModuleType, tp: TensorParallel = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Attention(config, ops, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = MLP(config, ops, tp)

    def forward(self, positions, x, residual, cos_sin_cache, kv_cache, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm.forward(x)
        else:
            x, residual = self.input_layernorm.forward(x, residual)
        x = self.self_attn.forward(positions, x, cos_sin_cache, kv_cache, meta)
        x, residual = self.post_attention_layernorm.forward(x, residual)
        return self.mlp.forward(x), residual
