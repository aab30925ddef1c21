"""CLIP and SigLIP vision encoders (ViT over fixed-size images), returning the hidden states a VLM reads."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import linear

# HF `hidden_act` names -> the function; the tanh forms agree to ~1e-7, well inside parity tolerances.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}

# A sparse vision_config (hub files keep only the keys that differ) falls back on these, as HF does.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6),
}


@dataclass(frozen=True, slots=True)
class VisionTowerConfig:
    model_type: str                      # 'clip_vision_model' | 'siglip_vision_model'
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int                      # square input side in pixels
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    @property
    def has_class_token(self) -> bool:
        """CLIP prepends a CLS embedding and layer-norms before the encoder; SigLIP does neither."""
        return self.model_type == "clip_vision_model"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.has_class_token)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str) -> "VisionTowerConfig":
        model_type = raw.get("model_type", "clip_vision_model")
        if model_type not in _DEFAULTS:
            raise ValueError(f"{source}: unsupported vision tower {model_type!r}; "
                             f"supported: {', '.join(sorted(_DEFAULTS))}")
        values = {**_DEFAULTS[model_type], **{k: raw[k] for k in _DEFAULTS[model_type] if k in raw}}
        for key in ("image_size", "patch_size"):
            if not isinstance(values[key], int):
                raise ValueError(f"{source}: vision_config.{key} must be one integer, got {values[key]!r}")
        if values["hidden_act"] not in ACTIVATIONS:
            raise ValueError(f"{source}: unsupported vision_config.hidden_act {values['hidden_act']!r}")
        return cls(model_type=model_type, **values)


class VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionTowerConfig):
        super().__init__()
        # CLIP's patch conv has no bias, SigLIP's has one.
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size,
                                         bias=not c.has_class_token)
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size)) if c.has_class_token else None
        # NOTE: _weight skips nn.Embedding's normal_ init (slow on meta); positions are always 0..P-1 here
        # (no interpolation: the processor resizes to image_size), so the table is added whole.
        self.position_embedding = nn.Embedding(c.num_positions, c.hidden_size,
                                               _weight=torch.empty(c.num_positions, c.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, positions, hidden]."""
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, c: VisionTowerConfig):
        super().__init__()
        self.num_heads = c.num_attention_heads
        # q, k, v fused at load time (one matmul); NOTE: not named qkv_proj, which the decoder's loader shards.
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = linear(x, self.qkv).view(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)   # bidirectional, scale head_dim ** -0.5 as HF
        return linear(out.transpose(1, 2).reshape(b, s, d), self.out_proj)


class VisionMLP(nn.Module):
    def __init__(self, c: VisionTowerConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.act(linear(x, self.fc1)), self.fc2)


class VisionEncoderLayer(nn.Module):
    def __init__(self, c: VisionTowerConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, c: VisionTowerConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(c) for _ in range(num_layers))


class VisionTower(nn.Module):
    """The ViT up to the deepest hidden state the caller reads; later layers and the post-layernorm (which
    only HF's pooled output and last_hidden_state pass through) are not built, their tensors not loaded.

    Parameter names follow HF's CLIPVisionModel / SiglipVisionModel (embeddings.*, pre_layrnorm.*,
    encoder.layers.N.*) except each layer's fused self_attn.qkv."""

    def __init__(self, c: VisionTowerConfig, num_layers: int):
        super().__init__()
        assert 0 <= num_layers <= c.num_hidden_layers, (num_layers, c.num_hidden_layers)
        self.config = c
        self.embeddings = VisionEmbeddings(c)
        # (sic) HF spells it pre_layrnorm; the same name keeps the checkpoint mapping one-to-one.
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if c.has_class_token else None
        self.encoder = VisionEncoder(c, num_layers)

    def forward(self, pixel_values: torch.Tensor, hidden_state_ids: tuple[int, ...]) -> list[torch.Tensor]:
        """pixel_values [B, C, S, S] -> the hidden states [B, positions, hidden] at hidden_state_ids, in
        that order: 0 is the encoder's input (embeddings, then CLIP's pre-layernorm), i the output of layer i."""
        c = self.config
        assert pixel_values.shape[1:] == (c.num_channels, c.image_size, c.image_size), pixel_values.shape
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            states[i] = x
        return [states[i] for i in hidden_state_ids]


def fuse_qkv(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF's separate q/k/v projections of one layer (names under `prefix` = '...self_attn.') -> qkv.*.

    Returns the fused tensors ready to load; empty while any of the six is still missing."""
    fused = {}
    for kind in ("weight", "bias"):
        parts = [weights.get(f"{prefix}{p}_proj.{kind}") for p in "qkv"]
        if any(p is None for p in parts):
            return {}
        fused[f"{prefix}qkv.{kind}"] = torch.cat(parts, dim=0)
    return fused
