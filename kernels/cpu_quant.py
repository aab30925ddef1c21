"""Quantized-weight matrix products on the CPU: GGUF 4/8-bit weights packed for the C kernel, and its twin.

Decode on the CPU is bound by reading the weights: float32 weights of the default model are ~540 MB a
step, its Q4_1/Q8_0 weights ~110 MB packed. kernels/cpu_kernels.c multiplies float32 activations by the
packed weights directly (float32 sums), so a step reads the small weights; or, in a second layout
(pack_int8), quantizes the activations to int8 per weight group and sums integer products (as llama.cpp does).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.cpu_build import load_library

TILE = 16     # outputs per packed tile (one 16-lane vector)
GROUP = 32    # inputs per scale/zero group
Q4_0_OFFSET = 8   # Q4_0's 4-bit values are q - 8 (GGUF stores q in 0..15)


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
    #                               (pack_int8: q4 [tiles, G, 4, 16, 4] uint8, q8 [tiles, G, group/4, 16, 4] int8)
    scale: torch.Tensor           # [tiles, G, 16] float32 (pack_int8: float16 where exact)
    zero: torch.Tensor | None     # [tiles, G, 16], as scale (always for q4; optional for q8)
    bits: int
    out_features: int            # N (rows past N in the last tile are padding)
    in_features: int             # K
    group: int = GROUP           # inputs per scale/zero group
    activations: str = "float32"  # "int8": pack_int8's layout, for the kernel that quantizes the activations
    offset: int = 0               # pack_int8's 4-bit weights with zero None: w = scale * (q - offset) (Q4_0: 8)

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
    """The inverse of `pack` and `pack_int8` (the twins and the tests read weights back through it)."""
    n, k, g = w.out_features, w.in_features, w.in_features // w.group
    scale = w.scale.transpose(1, 2).reshape(-1, g)[:n].float()
    zero = None if w.zero is None else w.zero.transpose(1, 2).reshape(-1, g)[:n].float()
    if w.offset:
        zero = scale * -float(w.offset)   # exact: the zero the offset stands for
    if w.activations == "int8":
        return _unpack_int8(w, scale, zero)
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
    if w.activations == "int8":
        lib.llm_int8_matmul(x.data_ptr(), m, w.in_features, w.data.data_ptr(), w.scale.data_ptr(),
                            None if w.zero is None else w.zero.data_ptr(), w.scale.dtype == torch.float16,
                            w.bits, w.group, w.offset, w.out_features, out.data_ptr())
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
    """The torch twin of quant_matmul on pack's layout: the same product through the float32 dequantized
    weight (pack_int8's layout: quant_matmul_int8_twin)."""
    if w.activations == "int8":
        return quant_matmul_int8_twin(x, w)
    return F.linear(x.float(), unpack(w).dequantize())


# -- int8 activations: the second layout and its twin ---------------------------------------------------


def pack_int8(w: QuantizedTensor) -> PackedWeight:
    """The layout of the int8-activation kernel: per group, 4 consecutive inputs of one output in each
    32-bit lane (what vpdpbusd / vpmaddubsw+vpmaddwd sum). 4-bit weights stay two to a byte: byte [c, i, b]
    of a group holds inputs 8c+b (low nibble) and 8c+4+b (high) of output i, unpacked in registers."""
    n, k = w.q.shape
    assert k % w.group == 0 and w.group % 16 == 0, f"input size {k} / group {w.group} do not fit the layout"
    g = k // w.group
    zero = None if w.zero is None else _group_major(w.zero, n)
    if w.bits == 4:
        assert w.group == GROUP and w.q.dtype == torch.uint8
        q = _tiles(w.q, n).view(-1, TILE, g, 4, 2, 4)                           # [tiles, 16, G, c, lo/hi, b]
        data = (q[..., 0, :] | (q[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).contiguous()  # [tiles, G, 4, 16, 4]
        if zero is None:
            zero = torch.zeros_like(_group_major(w.scale, n))
    else:
        assert w.bits == 8 and w.q.dtype == torch.int8
        q = _tiles(w.q, n).view(-1, TILE, g, w.group // 4, 4)
        data = q.permute(0, 2, 3, 1, 4).contiguous()                            # [tiles, G, group/4, 16, 4]
    scale = _group_major(w.scale, n)
    offset = 0
    if w.bits == 4 and w.zero is not None and torch.equal(w.zero, w.scale * -float(Q4_0_OFFSET)):
        # Q4_0 (zero = -8 * scale, exactly): the kernel subtracts 8 * sum(q) from each integer group sum, one
        # integer add a row and group where the zero term costs a float multiply-add
        zero, offset = None, Q4_0_OFFSET
    # GGUF's float16 scales stay float16 (exact): a sixth fewer bytes to read for 4-bit weights
    if all(t is None or torch.equal(t.half().float(), t) for t in (scale, zero)):
        scale, zero = scale.half(), None if zero is None else zero.half()
    return PackedWeight(data, scale, zero, w.bits, n, k, w.group, "int8", offset)


def to_int8_layout(w: PackedWeight) -> PackedWeight:
    """A packed weight in pack_int8's layout (unchanged if it is already); exact."""
    return w if w.activations == "int8" else pack_int8(unpack(w))


def _unpack_int8(w: PackedWeight, scale: torch.Tensor, zero: torch.Tensor | None) -> QuantizedTensor:
    n, k = w.out_features, w.in_features
    d = w.data.permute(0, 3, 1, 2, 4)                                           # [tiles, 16, G, c, b]
    if w.bits == 4:
        q = torch.stack([d & 15, d >> 4], dim=-2).reshape(-1, k)[:n]            # [.., c, lo/hi, b]
        return QuantizedTensor(q, scale, zero, 4)
    return QuantizedTensor(d.reshape(-1, k)[:n], scale, zero, 8, w.group)


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each `group` inputs of each row to int8, as the kernel does: d = max|x| / 127 and q = round(x * (1/d))
    (half to even), all in float32; an all-zero group gets d = 0, q = 0. Returns q [M, K] int8, d [M, K/group]."""
    m, k = x.shape
    xg = x.float().reshape(m, k // group, group)
    d = xg.abs().amax(dim=-1) / 127.0
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)
    q = torch.round(xg * inv[..., None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(m, k), d


def quantize_activations_c(x: torch.Tensor, group: int, lib: ctypes.CDLL) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """The kernel's own quantization (llm_quantize_activations): q, d and the int32 sums of q (tests)."""
    x = x.float().contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8)
    d = torch.empty((m, k // group), dtype=torch.float32)
    qsum = torch.empty((m, k // group), dtype=torch.int32)
    lib.llm_quantize_activations(x.data_ptr(), m, k, group, q.data_ptr(), d.data_ptr(), qsum.data_ptr())
    return q, d, qsum


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a * b + c rounded once (as the kernel's FMA): the product is exact in float64. Rounding the
    float64 sum to float32 is a second rounding, which can differ from the FMA's by an ulp in rare ties."""
    return (a.double() * b.double() + c.double()).float()


def quant_matmul_int8_twin(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """The torch twin of the int8-activation kernel: the same quantized rows, exact integer group sums (less
    offset * qsum for an offset weight), and per group acc = fma(scale, d * isum, fma(d * qsum, zero, acc)) in
    float32, groups in order."""
    qw = unpack(w)
    m, k = x.shape
    n, g, gs = w.out_features, k // w.group, w.group
    qx, d = quantize_activations(x, gs)
    # integer sums in float64: exact (|isum| < 2^21), and torch has no CPU integer matmul
    isum = torch.einsum("mgk,ngk->mng", qx.double().view(m, g, gs), qw.q.double().view(n, g, gs))
    qsum = qx.view(m, g, gs).sum(dim=-1, dtype=torch.int32).float()            # [M, G], exact
    zero = None if w.offset else qw.zero
    if w.offset:
        isum = isum - w.offset * qsum.double()[:, None, :]
    acc = torch.zeros(m, n)
    for j in range(g):
        if zero is not None:
            acc = _fma32((d[:, j] * qsum[:, j])[:, None], zero[None, :, j], acc)
        acc = _fma32(qw.scale[None, :, j], isum[:, :, j].float() * d[:, j, None], acc)
    return acc
