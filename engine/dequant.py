"""GGML block formats -> dense tensors: vectorized torch dequantization of GGUF tensor bytes."""
from __future__ import annotations

from typing import Callable

import torch

from engine.gguf_types import QUANT_SIZES, QT, SUPPORTED_QTYPES, type_name
from kernels.cpu_quant import QuantizedTensor


class UnsupportedQuantization(ValueError):
    """The GGML type has no dequantizer here; the message names the type."""


def _shifts(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian f16 at byte `start` of each block, as float32 [n_blocks, 1]."""
    # NOTE: .contiguous() copies only this 2-byte column, so the dtype view is legal at any offset.
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Split bytes into 4-bit values: per `group` bytes, all low nibbles first, then all high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> _shifts(0, 4).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _bits(qh: torch.Tensor, group: int, width: int) -> torch.Tensor:
    """Split bytes into `width`-bit fields: per `group` bytes, field 0 of every byte, then field 1 ..."""
    n = qh.shape[0]
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).reshape(1, 1, -1, 1)
    q = qh.reshape(n, -1, 1, group) >> shifts
    return (q & ((1 << width) - 1)).reshape(n, -1)


def _u32_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 high bits: 4 bytes read as a little-endian u32, bit j -> element j."""
    q = qh.reshape(-1, 4, 1) >> torch.arange(8, dtype=torch.uint8)
    return (q & 1).reshape(-1, 32)


# NOTE: results are built in place (one float32 buffer per tensor): fresh buffers cost page faults,
# which dominated load time. The float ops and their order match gguf-py, so results are bit-exact.
def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 2:], 16).float().sub_(8).mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 4:], 16).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:], 16) | (_u32_bits(b[:, 2:6]) << 4)
    return q.float().sub_(16).mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:], 16) | (_u32_bits(b[:, 4:8]) << 4)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float().mul_(_f16(b, 0))


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # block: scales[16] (lo nibble scale, hi nibble min), qs[64] (2-bit), d, dmin
    n, scales = b.shape[0], b[:, :16]
    dl = (_f16(b, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(b[:, 16:80], 32, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # block: hmask[32] (high bit, inverted), qs[64] (low 2 bits), scales[12] (16 x 6-bit), d
    n = b.shape[0]
    low = _bits(b[:, 96:104], 8, 4)            # 16 low nibbles: bytes 0-7 lo, then bytes 0-7 hi
    high = _bits(b[:, 104:108], 4, 2)          # 16 two-bit fields: bytes 8-11, each shift in turn
    scales = (low | (high << 4)).float() - 32
    dl = (_f16(b, 108) * scales).reshape(n, 16, 1)
    ql = _bits(b[:, 32:96], 32, 2).reshape(n, 16, 16)
    qh = _bits(b[:, :32], 32, 1).reshape(n, 16, 16)
    # NOTE: a set hmask bit means "no -4 offset", so the subtracted term is (1 - bit) * 4.
    q = ql.float() - 4 * (1 - qh.float())
    return (dl * q).reshape(n, 256)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, as float32 [n, 8]."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # block: d, dmin, scales[12], qs[128] (4-bit, 8 sub-blocks of 32)
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # block: d, dmin, scales[12], qh[32] (5th bit, bit i -> sub-block i), qs[128]
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    q = _nibbles(b[:, 48:], 32) | (_bits(b[:, 16:48], 32, 1) << 4)
    return (d * q.reshape(n, 8, 32).float() - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # block: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    q = _nibbles(b[:, :128], 64) | (_bits(b[:, 128:192], 32, 2) << 4)
    return (d * (q.float() - 32).reshape(n, 16, 16)).reshape(n, 256)


_BLOCK_DEQUANT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1, QT.Q8_0: _q8_0,
    QT.Q2_K: _q2_k, QT.Q3_K: _q3_k, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
}
_FLOAT_VIEWS = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
assert SUPPORTED_QTYPES == frozenset(int(t) for t in (*_BLOCK_DEQUANT, *_FLOAT_VIEWS)), "gguf_types is stale"


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Decode `raw` (the tensor's uint8 bytes, C order) of GGML type `qtype` into `shape` (torch order)."""
    if int(qtype) not in SUPPORTED_QTYPES:
        raise UnsupportedQuantization(f"unsupported GGUF quantization {type_name(qtype)}")
    qtype = QT(qtype)
    block_size, type_size = QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    num_elements = 1
    for s in shape:
        num_elements *= s
    if shape and shape[-1] % block_size:
        raise ValueError(f"{qtype.name}: row length {shape[-1]} is not a multiple of the block size {block_size}")
    if raw.dtype != torch.uint8 or raw.numel() != num_elements // block_size * type_size:
        raise ValueError(f"{qtype.name}: expected {num_elements // block_size * type_size} uint8 bytes for "
                         f"shape {shape}, got {raw.numel()} {raw.dtype}")
    flat = raw.reshape(-1)
    if qtype in _FLOAT_VIEWS:
        # Plain floats: a view, so an F32 tensor read as float32 is never copied.
        out = flat.view(_FLOAT_VIEWS[qtype])
        return out.reshape(shape) if out.dtype == dtype else out.float().to(dtype).reshape(shape)
    out = _BLOCK_DEQUANT[qtype](flat.reshape(-1, type_size))
    return out.to(dtype).reshape(shape)


# -- integer form, for the quantized CPU kernel (kernels/cpu_kernels.c) --------------------------------
# Each returns (q [n_blocks, elements], scale and zero [n_blocks, elements / group]) with
# dequantized == scale * q + zero per group, the same values the float path computes. 5- and 6-bit
# values are widened to int8 (the 8-bit kernel), 4-bit ones packed two to a byte.

def _split_q4_0(b: torch.Tensor):
    d = _f16(b, 0)
    return _nibbles(b[:, 2:], 16), d, d * -8.0


def _split_q4_1(b: torch.Tensor):
    return _nibbles(b[:, 4:], 16), _f16(b, 0), _f16(b, 2)


def _split_q4_k(b: torch.Tensor):
    sc, mn = _k_scale_min(b[:, 4:16])
    return _nibbles(b[:, 16:], 32), _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _split_q5_0(b: torch.Tensor):
    q = _nibbles(b[:, 6:], 16) | (_u32_bits(b[:, 2:6]) << 4)
    return (q.to(torch.int16) - 16).to(torch.int8), _f16(b, 0), None


def _split_q5_1(b: torch.Tensor):
    q = _nibbles(b[:, 8:], 16) | (_u32_bits(b[:, 4:8]) << 4)
    return q.to(torch.int8), _f16(b, 0), _f16(b, 2)


def _split_q5_k(b: torch.Tensor):
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 48:], 32) | (_bits(b[:, 16:48], 32, 1) << 4)
    return q.to(torch.int8), _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _split_q6_k(b: torch.Tensor):
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    q = _nibbles(b[:, :128], 64) | (_bits(b[:, 128:192], 32, 2) << 4)
    return (q.to(torch.int16) - 32).to(torch.int8), _f16(b, 208) * scales, None


def _split_q8_0(b: torch.Tensor):
    return b[:, 2:].contiguous().view(torch.int8), _f16(b, 0), None


# GGML type -> (split, bits the kernel reads, inputs per group)
_BLOCK_SPLIT = {QT.Q4_0: (_split_q4_0, 4, 32), QT.Q4_1: (_split_q4_1, 4, 32), QT.Q4_K: (_split_q4_k, 4, 32),
                QT.Q5_0: (_split_q5_0, 8, 32), QT.Q5_1: (_split_q5_1, 8, 32), QT.Q5_K: (_split_q5_k, 8, 32),
                QT.Q6_K: (_split_q6_k, 8, 16), QT.Q8_0: (_split_q8_0, 8, 32)}


def split_quantized(raw: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> QuantizedTensor | None:
    """A 2-D tensor's bytes as integers and per-group scales; None for types the kernel lacks."""
    if int(qtype) not in _BLOCK_SPLIT or len(shape) != 2:
        return None
    split, bits, group = _BLOCK_SPLIT[QT(qtype)]
    block_size, type_size = QUANT_SIZES[qtype]
    n, k = (int(s) for s in shape)
    q, scale, zero = split(raw.reshape(-1, type_size))
    return QuantizedTensor(q.reshape(n, k), scale.reshape(n, k // group),
                           None if zero is None else zero.reshape(n, k // group), bits, group)
