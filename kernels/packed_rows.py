"""Rows of a packed weight as float32: an embedding lookup that reads the packed table (kernels/cpu_quant.py),
so a GGUF model's token embedding needs no float32 copy (~113 MB for the default model's 49152 x 576).

Exact: each value is q * scale (+ zero) in float32, the very operations of QuantizedTensor.dequantize (and
of the GGUF dequantizers, which the loader's tests hold to HF's values), so a lookup equals the float table's row.
"""
from __future__ import annotations

import torch

from kernels.cpu_quant import TILE, PackedWeight


def packed_rows(w: PackedWeight, ids: torch.Tensor) -> torch.Tensor:
    """W[ids] -> [len(ids), K] float32, for either packed layout (pack or pack_int8)."""
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
