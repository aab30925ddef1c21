"""Quantized-weight matrix products on the CPU: GGUF 4/8-bit weights packed for the C kernel, and its twin.

Decode on the CPU is bound by reading the weights: float32 weights of the default model are ~540 MB a
step, its Q4_1/Q8_0 weights ~110 MB packed. kernels/cpu_kernels.c multiplies float32 activations by the
packed weights directly (float32 sums), so a step reads the small weights.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.cpu_build import load_library

TILE = 16     # outputs per packed tile (one 16-lane vector)
GROUP = 32    # inputs per scale/zero group


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    """A weight [N, K] as integers and per-group affine terms: w = scale * q (+ zero), groups of `group`
    inputs (32; 16 for Q6_K)."""
    q: torch.Tensor               # [N, K] uint8 in 0..15 (bits=4) or int8 (bits=8)
    scale: torch.Tensor           # [N, K/group] float32
    zero: torch.Tensor | None     # [N, K/group] float32 (None means 0)
    bits: int
    group: int = GROUP

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = self.q.float().view(n, k // self.group, self.group) * self.scale[..., None]
        if self.zero is not None:
            w = w + self.zero[..., None]
        return w.view(n, k)


def widen(w: QuantizedTensor, group: int) -> QuantizedTensor:
    """The same weight as 8-bit integers in groups of `group` inputs (a divisor of w.group); exact."""
    assert w.group % group == 0
    repeat = w.group // group
    scale = w.scale.repeat_interleave(repeat, dim=1)
    zero = None if w.zero is None else w.zero.repeat_interleave(repeat, dim=1)
    return QuantizedTensor(w.q.to(torch.int8), scale, zero, 8, group)


def cat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack weights along the output dimension (fused q/k/v, gate/up). Shards of different kinds (Q4_K_M
    keeps attn_v in Q6_K beside Q4_K q and k) are widened to 8 bits in the smallest group first."""
    if len({(p.bits, p.group) for p in parts}) > 1:
        group = min(p.group for p in parts)
        parts = [widen(p, group) for p in parts]
    bits, group = parts[0].bits, parts[0].group
    zero = None
    if any(p.zero is not None for p in parts):
        zero = torch.cat([p.zero if p.zero is not None else torch.zeros_like(p.scale) for p in parts])
    return QuantizedTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zero, bits, group)


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A weight in the kernel's tiled layout (see the header of kernels/cpu_kernels.c)."""
    data: torch.Tensor            # q4: [tiles, G, 16, 16] uint8 (two inputs per byte); q8: [tiles, G, group, 16] int8
    scale: torch.Tensor           # [tiles, G, 16] float32
    zero: torch.Tensor | None     # [tiles, G, 16] float32 (always for q4; optional for q8)
    bits: int
    out_features: int            # N (rows past N in the last tile are padding)
    in_features: int             # K
    group: int = GROUP           # inputs per scale/zero group

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)


def _tiles(t: torch.Tensor, n: int) -> torch.Tensor:
    """[N, ...] -> [tiles, 16, ...], zero rows appended up to a whole tile."""
    pad = -n % TILE
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    return t.view(-1, TILE, *t.shape[1:])


def _group_major(t: torch.Tensor, n: int) -> torch.Tensor:
    """[N, G] -> [tiles, G, 16] float32."""
    return _tiles(t.float(), n).transpose(1, 2).contiguous()


def pack(w: QuantizedTensor) -> PackedWeight:
    n, k = w.q.shape
    assert k % w.group == 0, f"input size {k} is not a multiple of the group size {w.group}"
    g = k // w.group
    zero = None if w.zero is None else _group_major(w.zero, n)
    if w.bits == 4:
        assert w.group == GROUP and w.q.dtype == torch.uint8
        q = _tiles(w.q, n).view(-1, TILE, g, GROUP // 2, 2)                    # [tiles, 16, G, 16, 2]
        data = (q[..., 0] | (q[..., 1] << 4)).permute(0, 2, 3, 1).contiguous()  # [tiles, G, 16, 16]
        if zero is None:
            zero = torch.zeros_like(_group_major(w.scale, n))
    else:
        assert w.bits == 8 and w.q.dtype == torch.int8 and w.group % 2 == 0
        data = _tiles(w.q, n).view(-1, TILE, g, w.group).permute(0, 2, 3, 1).contiguous()  # [tiles, G, group, 16]
    return PackedWeight(data, _group_major(w.scale, n), zero, w.bits, n, k, w.group)


def unpack(w: PackedWeight) -> QuantizedTensor:
    """The inverse of `pack` (the twin and the tests read weights back through it)."""
    n, k, g = w.out_features, w.in_features, w.in_features // w.group
    scale = w.scale.transpose(1, 2).reshape(-1, g)[:n]
    zero = None if w.zero is None else w.zero.transpose(1, 2).reshape(-1, g)[:n]
    if w.bits == 4:
        d = w.data.permute(0, 3, 1, 2)                                          # [tiles, 16, G, 16]
        q = torch.stack([d & 15, d >> 4], dim=-1).reshape(-1, k)[:n]
        return QuantizedTensor(q, scale, zero, 4)
    q = w.data.permute(0, 3, 1, 2).reshape(-1, k)[:n]
    return QuantizedTensor(q, scale, zero, 8, w.group)


def quant_matmul(x: torch.Tensor, w: PackedWeight, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W^T -> [M, N] float32, reading W packed. lib: a bound library (tests)."""
    lib = lib or load_library()
    assert lib is not None, "quant_matmul needs the compiled kernel (check load_library() first)"
    assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == w.in_features
    x = x.contiguous()
    m = x.shape[0]
    out = torch.empty((m, w.out_features), dtype=torch.float32)
    if m == 0:
        return out
    zero = xsum = None
    if w.zero is not None:
        # NOTE: the scratch tensor (per-group input sums for the zero terms) must outlive the call
        scratch = torch.empty((m, w.in_features // w.group), dtype=torch.float32)
        zero, xsum = w.zero.data_ptr(), scratch.data_ptr()
    if w.bits == 4:
        lib.llm_q4_matmul(x.data_ptr(), m, w.in_features, w.data.data_ptr(), w.scale.data_ptr(), zero,
                          w.out_features, out.data_ptr(), xsum)
    else:
        lib.llm_q8_matmul(x.data_ptr(), m, w.in_features, w.data.data_ptr(), w.scale.data_ptr(), zero,
                          w.group, w.out_features, out.data_ptr(), xsum)
    return out


def quant_matmul_twin(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """The torch twin of quant_matmul: the same product through the float32 dequantized weight."""
    return F.linear(x.float(), unpack(w).dequantize())
