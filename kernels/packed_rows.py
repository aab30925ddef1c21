"""Rows of a packed weight as float32: an embedding lookup that reads the packed table (kernels/cpu_quant.py),
so a GGUF model's token embedding needs no float32 copy (~113 MB for the default model's 49152 x 576).

Exact: each value is q * scale (+ zero) in float32, the very operations of QuantizedTensor.dequantize (and
of the GGUF dequantizers, which the loader's tests hold to HF's values), so a lookup equals the float table's row.
The C kernel (llm_packed_rows) does it in one call: the torch ops of the twin cost ~0.25 ms a decode step, each
one slow after the step's weights have streamed through the caches.
"""
from __future__ import annotations

import ctypes

import torch

from kernels.cpu_build import load_library
from kernels.cpu_quant import TILE, PackedWeight


def packed_rows(w: PackedWeight, ids: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """W[ids] -> [len(ids), K] float32, for either packed layout (pack or pack_int8); the twin where the
    kernels are not built. lib: a bound library (tests)."""
    lib = lib or load_library()
    if lib is None or w.group > 32:
        return packed_rows_twin(w, ids)
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty((ids.shape[0], w.in_features), dtype=torch.float32)
    bad = lib.llm_packed_rows(w.data.data_ptr(), w.scale.data_ptr(), None if w.zero is None else w.zero.data_ptr(),
                              w.scale.dtype == torch.float16, w.bits, w.group, w.offset, w.activations == "int8",
                              w.out_features, w.in_features, ids.data_ptr(), ids.shape[0], out.data_ptr())
    if bad:
        raise IndexError(f"{bad} of the ids are outside the table's {w.out_features} rows")
    return out


def packed_rows_twin(w: PackedWeight, ids: torch.Tensor) -> torch.Tensor:
    """The torch twin of packed_rows."""
    ids = ids.to(torch.int64)
    tile, lane = ids // TILE, ids % TILE
    g = w.in_features // w.group
    if w.activations == "int8":
        d = w.data[tile, :, :, lane]                 # q4 [B, G, 4, 4]: byte [c, b] = inputs 8c+b | 8c+4+b << 4
        if w.bits == 4:                              # q8 [B, G, group/4, 4]
            d = torch.stack([d & 15, d >> 4], dim=-2)
    else:
        d = w.data[tile, :, :, lane]                 # q4 [B, G, 16]: byte k = inputs 2k | 2k+1 << 4
        if w.bits == 4:                              # q8 [B, G, group]
            d = torch.stack([d & 15, d >> 4], dim=-1)
    q = d.reshape(len(ids), g, w.group).float()
    out = q * w.scale[tile, :, lane].float()[..., None]
    if w.zero is not None:
        out = out + w.zero[tile, :, lane].float()[..., None]
    elif w.offset:   # the zero it stands for, -offset * scale (exact), added as the zero would be
        out = out + (w.scale[tile, :, lane].float() * -float(w.offset))[..., None]
    return out.reshape(len(ids), w.in_features)
