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
    """A weight [N, K] as integers and per-32-input-group affine terms: w = scale * q (+ zero)."""
    q: torch.Tensor               # [N, K] uint8 in 0..15 (bits=4) or int8 (bits=8)
    scale: torch.Tensor           # [N, K/32] float32
    zero: torch.Tensor | None     # [N, K/32] float32 (4-bit only; None means 0)
    bits: int

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = self.q.float().view(n, k // GROUP, GROUP) * self.scale[..., None]
        if self.zero is not None:
            w = w + self.zero[..., None]
        return w.view(n, k)


def cat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack weights along the output dimension (fused q/k/v, gate/up)."""
    bits = {p.bits for p in parts}
    assert len(bits) == 1, "fused shards must share one quantization width"
    zeros = [p.zero if p.zero is not None else torch.zeros_like(p.scale) for p in parts]
    return QuantizedTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                           torch.cat(zeros) if parts[0].bits == 4 else None, bits.pop())


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A weight in the kernel's tiled layout (see the header of kernels/cpu_kernels.c)."""
    data: torch.Tensor            # q4: [tiles, G, 16, 16] uint8 (two inputs per byte); q8: [tiles, G, 32, 16] int8
    scale: torch.Tensor           # [tiles, G, 16] float32
    zero: torch.Tensor | None     # [tiles, G, 16] float32, q4 only
    bits: int
    out_features: int            # N (rows past N in the last tile are padding)
    in_features: int             # K

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)


def _tiles(t: torch.Tensor, n: int) -> torch.Tensor:
    """[N, ...] -> [tiles, 16, ...], zero rows appended up to a whole tile."""
    pad = -n % TILE
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    return t.view(-1, TILE, *t.shape[1:])


def pack(w: QuantizedTensor) -> PackedWeight:
    n, k = w.q.shape
    assert k % GROUP == 0, f"input size {k} is not a multiple of {GROUP}"
    g = k // GROUP
    scale = _tiles(w.scale.float(), n).transpose(1, 2).contiguous()           # [tiles, G, 16]
    zero = None
    if w.bits == 4:
        q = _tiles(w.q, n).view(-1, TILE, g, GROUP // 2, 2)                    # [tiles, 16, G, 16, 2]
        data = (q[..., 0] | (q[..., 1] << 4)).permute(0, 2, 3, 1).contiguous()  # [tiles, G, 16, 16]
        z = w.zero if w.zero is not None else torch.zeros_like(w.scale)
        zero = _tiles(z.float(), n).transpose(1, 2).contiguous()
    else:
        assert w.bits == 8 and w.q.dtype == torch.int8
        data = _tiles(w.q, n).view(-1, TILE, g, GROUP).permute(0, 2, 3, 1).contiguous()  # [tiles, G, 32, 16]
    return PackedWeight(data, scale, zero, w.bits, n, k)


def unpack(w: PackedWeight) -> QuantizedTensor:
    """The inverse of `pack` (the twin and the tests read weights back through it)."""
    n, k = w.out_features, w.in_features
    scale = w.scale.transpose(1, 2).reshape(-1, k // GROUP)[:n]
    if w.bits == 4:
        d = w.data.permute(0, 3, 1, 2)                                          # [tiles, 16, G, 16]
        q = torch.stack([d & 15, d >> 4], dim=-1).reshape(-1, k)[:n]
        zero = w.zero.transpose(1, 2).reshape(-1, k // GROUP)[:n]
        return QuantizedTensor(q, scale, zero, 4)
    q = w.data.permute(0, 3, 1, 2).reshape(-1, k)[:n]
    return QuantizedTensor(q, scale, None, 8)


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
    if w.bits == 4:
        xsum = torch.empty((m, w.in_features // GROUP), dtype=torch.float32)
        lib.llm_q4_matmul(x.data_ptr(), m, w.in_features, w.data.data_ptr(), w.scale.data_ptr(),
                          w.zero.data_ptr(), w.out_features, out.data_ptr(), xsum.data_ptr())
    else:
        lib.llm_q8_matmul(x.data_ptr(), m, w.in_features, w.data.data_ptr(), w.scale.data_ptr(),
                          w.out_features, out.data_ptr())
    return out


def quant_matmul_twin(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """The torch twin of quant_matmul: the same product through the float32 dequantized weight."""
    return F.linear(x.float(), unpack(w).dequantize())
