"""Tensor parallel, Megatron-style: which slice of each weight a rank holds, and the all-reduce after a
row-parallel projection.

q/k/v and gate/up are column-parallel (a rank holds the output rows of its heads / its share of the MLP),
o_proj and down_proj row-parallel (a rank holds the matching input columns and its partial sums are added
by one all-reduce). Embeddings, norms and the LM head are replicated.
NOTE: with size 1 nothing here imports torch.distributed, and every slice is the whole tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from kernels.cpu_quant import QuantizedTensor

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")   # checkpoint names: rows split
ROW_PARALLEL = ("o_proj", "down_proj")                                     # checkpoint names: columns split


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This process's place among the ranks."""
    rank: int = 0
    size: int = 1

    def num_heads(self, config: ModelConfig) -> int:
        return config.num_attention_heads // self.size

    def num_kv_heads(self, config: ModelConfig) -> int:
        """KV heads this rank holds: its share, or one replicated head when there are more ranks than heads."""
        return max(1, config.num_key_value_heads // self.size)

    def first_kv_head(self, config: ModelConfig) -> int:
        # NOTE: with size > num_kv_heads, ranks r * num_kv // size share a head: the one their q heads use
        # (q head h reads kv head h // (heads / kv_heads); rank r holds q heads r * heads / size onward).
        return self.rank * config.num_key_value_heads // self.size

    def intermediate_size(self, config: ModelConfig) -> int:
        return config.intermediate_size // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial outputs of a row-parallel projection, in place (default group)."""
        if self.size > 1:
            import torch.distributed as dist
            dist.all_reduce(x)
        return x


SINGLE = TensorParallel()


def valid_sizes(config: ModelConfig) -> list[int]:
    """Tensor-parallel sizes this model splits evenly: they divide the attention heads and the MLP, and
    either divide the KV heads or are a multiple of them (each KV head then replicated on size / kv ranks)."""
    kv = config.num_key_value_heads
    return [n for n in range(1, config.num_attention_heads + 1)
            if config.num_attention_heads % n == 0 and config.intermediate_size % n == 0
            and (kv % n == 0 or n % kv == 0)]


def check_size(config: ModelConfig, size: int) -> None:
    """A one-line ValueError when `size` does not split this model, naming the sizes that do."""
    if size not in valid_sizes(config):
        raise ValueError(
            f"tensor_parallel_size={size} does not split this model ({config.num_attention_heads} attention "
            f"heads, {config.num_key_value_heads} KV heads, intermediate size {config.intermediate_size}); "
            f"sizes that work: {', '.join(map(str, valid_sizes(config)))}")


def _row_range(projection: str, config: ModelConfig, tp: TensorParallel) -> tuple[int, int]:
    """(start, length) of this rank's output rows of a column-parallel checkpoint projection."""
    d = config.head_dim
    if projection == "q_proj":
        n = tp.num_heads(config) * d
        return tp.rank * n, n
    if projection in ("k_proj", "v_proj"):
        n = tp.num_kv_heads(config)
        return tp.first_kv_head(config) * d, n * d
    n = tp.intermediate_size(config)   # gate_proj, up_proj
    return tp.rank * n, n


def _column_range(projection: str, config: ModelConfig, tp: TensorParallel) -> tuple[int, int]:
    """(start, length) of this rank's input columns of a row-parallel checkpoint projection."""
    n = tp.num_heads(config) * config.head_dim if projection == "o_proj" else tp.intermediate_size(config)
    return tp.rank * n, n


def _projection(name: str) -> str | None:
    """'layers.3.self_attn.q_proj.weight' -> 'q_proj' (None for tensors no rank splits)."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-2] in COLUMN_PARALLEL + ROW_PARALLEL else None


def shard_tensor(name: str, tensor: torch.Tensor, config: ModelConfig, tp: TensorParallel) -> torch.Tensor:
    """This rank's slice of a checkpoint tensor (HF name): rows of column-parallel weights and biases,
    columns of row-parallel weights, the whole of anything else."""
    projection = _projection(name)
    if tp.size == 1 or projection is None:
        return tensor
    if projection in COLUMN_PARALLEL:
        return tensor.narrow(0, *_row_range(projection, config, tp))
    if tensor.dim() == 1:
        return tensor   # a row-parallel bias is added once, after the sum (none of ours has one)
    return tensor.narrow(1, *_column_range(projection, config, tp))


def shard_quantized(name: str, w: QuantizedTensor, config: ModelConfig,
                    tp: TensorParallel) -> QuantizedTensor | None:
    """This rank's slice of a quantized checkpoint weight, before packing; None when the slice would cut
    a quantization group (a row-parallel shard whose columns are not whole groups): that projection then
    stays float."""
    projection = _projection(name)
    if tp.size == 1 or projection is None:
        return w
    if projection in COLUMN_PARALLEL:   # whole rows: each keeps its own groups
        start, n = _row_range(projection, config, tp)
        return QuantizedTensor(w.q[start:start + n], w.scale[start:start + n],
                               None if w.zero is None else w.zero[start:start + n], w.bits, w.group)
    start, n = _column_range(projection, config, tp)
    if start % w.group or n % w.group:
        return None
    g0, g = start // w.group, n // w.group
    return QuantizedTensor(w.q[:, start:start + n].contiguous(), w.scale[:, g0:g0 + g].contiguous(),
                           None if w.zero is None else w.zero[:, g0:g0 + g].contiguous(), w.bits, w.group)
