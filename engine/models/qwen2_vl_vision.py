"""The Qwen2-VL / Qwen2.5-VL vision transformer: 3-D patch embedding, 2-D rotary, blocks, patch merger.

Qwen2-VL's blocks are LayerNorm + quick-GELU MLP, all attending within their image. Qwen2.5-VL's are
RMSNorm + SwiGLU and attend within windows of window_size pixels, except the fullatt_block_indexes blocks;
for that its patches run in window order (merge blocks grouped window by window), and the merger's
output goes back to row-major order at the end.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig

Grid = tuple[int, int, int]   # (t, h, w) in patches, before merging


@dataclass(frozen=True, slots=True)
class VisionConfig:
    depth: int
    embed_dim: int                       # width of the blocks
    num_heads: int
    mlp_dim: int                         # hidden width of a block's MLP
    hidden_act: str                      # 'quick_gelu' (Qwen2-VL) | 'silu' (Qwen2.5-VL) | 'gelu' ...
    out_dim: int                         # the merger's output: the language model's hidden size
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int                      # merge_size x merge_size patches become one language-model token
    rope_theta: float
    is_windowed: bool                    # Qwen2.5-VL: RMSNorm + SwiGLU blocks, window attention
    window_size: int = 0                 # pixels per window side (Qwen2.5-VL)
    fullatt_block_indexes: tuple[int, ...] = ()   # blocks attending over the whole image (Qwen2.5-VL)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> "VisionConfig":
        """From config.json's vision_config; the two families name the widths differently."""
        vc = (config.vision or {}).get("vision_config") or {}
        is_windowed = config.architecture == "Qwen2_5_VLForConditionalGeneration"
        common = dict(
            depth=int(vc.get("depth", 32)), num_heads=int(vc.get("num_heads", 16)),
            in_channels=int(vc.get("in_channels", vc.get("in_chans", 3))),
            patch_size=int(vc.get("patch_size", vc.get("spatial_patch_size", 14))),
            temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
            merge_size=int(vc.get("spatial_merge_size", 2)),
            rope_theta=float((vc.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            is_windowed=is_windowed)
        if is_windowed:
            return cls(**common, embed_dim=int(vc.get("hidden_size", 1280)),
                       mlp_dim=int(vc.get("intermediate_size", 3420)), hidden_act=vc.get("hidden_act", "silu"),
                       out_dim=int(vc.get("out_hidden_size", config.hidden_size)),
                       window_size=int(vc.get("window_size", 112)),
                       fullatt_block_indexes=tuple(vc.get("fullatt_block_indexes", (7, 15, 23, 31))))
        embed_dim = int(vc.get("embed_dim", 1280))
        return cls(**common, embed_dim=embed_dim, mlp_dim=int(embed_dim * vc.get("mlp_ratio", 4)),
                   hidden_act=vc.get("hidden_act", "quick_gelu"), out_dim=int(vc.get("hidden_size", config.hidden_size)))


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unsupported vision activation {name!r}")


class VisionRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _norm(cfg: VisionConfig, size: int) -> nn.Module:
    return VisionRMSNorm(size) if cfg.is_windowed else nn.LayerNorm(size, eps=1e-6)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[int]) -> torch.Tensor:
        """x: [N, E]; cos, sin: [N, head_dim] float32; segments: lengths of the runs of rows that attend
        to each other (an image or a window), summing to N."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # rotary in float32 whatever the model's dtype, as HF does
        c, s = cos[:, None], sin[:, None]
        q = (q.float() * c + _rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(x.dtype)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))   # [heads, N, head_dim]
        # One attention call per segment: no N x N mask, and a segment is only ever a few thousand rows.
        outs = [F.scaled_dot_product_attention(qs, ks, vs) for qs, ks, vs in
                zip(q.split(segments, 1), k.split(segments, 1), v.split(segments, 1))]
        return self.proj(torch.cat(outs, dim=1).transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    """Qwen2-VL: fc1 -> act -> fc2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = cfg.hidden_act
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


class VisionGatedMLP(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), with biases.

    NOTE: named gate/up/down, not HF's gate_proj/up_proj/down_proj: the decoder's loader fuses any
    '.gate_proj.' tensor into the language model's gate_up_proj (qwen2_vl.py renames on load)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = cfg.hidden_act
        self.gate = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.up = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.down = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(activation(self.act, self.gate(x)) * self.up(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = _norm(cfg, cfg.embed_dim)
        self.attn = VisionAttention(cfg)
        self.norm2 = _norm(cfg, cfg.embed_dim)
        self.mlp = VisionGatedMLP(cfg) if cfg.is_windowed else VisionMLP(cfg)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm each patch, join each run of merge_size**2 rows (one merge block), two-layer GELU MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.joined = cfg.embed_dim * cfg.merge_size ** 2
        self.ln_q = _norm(cfg, cfg.embed_dim)
        self.mlp = nn.Sequential(nn.Linear(self.joined, self.joined), nn.GELU(), nn.Linear(self.joined, cfg.out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.joined))


class PatchEmbed(nn.Module):
    """A Conv3d's weight (the checkpoint's shape) whose stride is its kernel: one matmul per patch row."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 4), persistent=False)
        if not self.inv_freq.is_meta:
            self.init_buffers(self.inv_freq.device)

    def init_buffers(self, device: torch.device) -> None:
        """The rotary frequencies, float32 whatever the model's dtype (lost on the loader's meta build)."""
        spatial = self.cfg.head_dim // 2
        exponents = torch.arange(0, spatial, 2, dtype=torch.float32, device=device) / spatial
        self.inv_freq = 1.0 / (self.cfg.rope_theta ** exponents)

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """pixel_values: [sum of t*h*w, C*T*P*P], the images' patch rows one after another, each image's
        in merge-block order -> [sum of t*h*w / merge**2, out_dim], the same order."""
        cfg = self.cfg
        dev = pixel_values.device
        x = self.patch_embed(pixel_values)
        freqs = torch.from_numpy(patch_coordinates(grids, cfg.merge_size)).to(dev).float()[..., None] * self.inv_freq
        angles = freqs.flatten(1)   # [N, head_dim/2]: the h frequencies, then the w ones
        angles = torch.cat((angles, angles), dim=-1)
        full = [h * w_ for t, h, w_ in grids for _ in range(t)]   # each frame of each image attends within itself
        if cfg.is_windowed:
            order, windows = window_order(grids, cfg.merge_size, cfg.window_size // cfg.merge_size // cfg.patch_size)
            unit = cfg.merge_size ** 2
            rows = torch.from_numpy((order[:, None] * unit + np.arange(unit)).ravel()).to(dev)
            x, angles = x[rows], angles[rows]
        cos, sin = angles.cos(), angles.sin()
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, windows if cfg.is_windowed and i not in cfg.fullatt_block_indexes else full)
        out = self.merger(x)
        if cfg.is_windowed:
            out = out[torch.from_numpy(np.argsort(order)).to(dev)]
        return out


def patch_coordinates(grids: Sequence[Grid], merge_size: int) -> np.ndarray:
    """[N, 2] (row, column) of each patch row, in the processor's merge-block order, frames repeating."""
    parts = []
    m = merge_size
    for t, h, w in grids:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        # [block_row, m_row, block_col, m_col] -> [block_row, block_col, m_row, m_col]
        coords = np.stack([rows, cols], axis=-1).reshape(h // m, m, w // m, m, 2).transpose(0, 2, 1, 3, 4)
        parts.append(np.tile(coords.reshape(-1, 2), (t, 1)))
    return np.concatenate(parts)


def window_order(grids: Sequence[Grid], merge_size: int, window_units: int) -> tuple[np.ndarray, list[int]]:
    """Qwen2.5-VL's windows: (the merge blocks' indices in window order, each window's length in patches).

    Each frame's grid of merge blocks is cut into window_units x window_units windows from the top left
    (the last row and column of windows may be partial); windows run row-major, blocks row-major in each."""
    order, lengths = [], []
    base = 0
    for t, h, w in grids:
        bh, bw = h // merge_size, w // merge_size
        ids = np.arange(t * bh * bw).reshape(t, bh, bw) + base
        for frame in ids:
            for r in range(0, bh, window_units):
                for c in range(0, bw, window_units):
                    window = frame[r:r + window_units, c:c + window_units].ravel()
                    order.append(window)
                    lengths.append(window.size * merge_size ** 2)
        base += t * bh * bw
    return np.concatenate(order), lengths
