"""BERT encoder (as sentence-transformers uses it, and XLM-RoBERTa's): embeddings, N post-norm bidirectional layers."""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_kinds import ENCODER_MODEL_TYPES

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),                                   # erf form, as BERT was trained
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True, slots=True)
class BertConfig:
    """The few config.json fields a BERT encoder needs (kept apart from the decoders' ModelConfig)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    position_offset: int = 0     # RoBERTa-likes number real positions from pad_token_id + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> "BertConfig":
        model_type = raw.get("model_type", "bert")
        if model_type not in ENCODER_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not a BERT encoder "
                             f"(supported: {', '.join(ENCODER_MODEL_TYPES)})")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings")
        missing = [k for k in required if not isinstance(raw.get(k), int) or raw[k] <= 0]
        if missing:
            raise ValueError(f"{source}: missing or non-positive integer key(s) {', '.join(missing)}")
        if raw["hidden_size"] % raw["num_attention_heads"]:
            raise ValueError(f"{source}: hidden_size ({raw['hidden_size']}) is not a multiple of "
                             f"num_attention_heads ({raw['num_attention_heads']})")
        act = raw.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"{source}: unsupported hidden_act {act!r}; "
                             f"supported: {', '.join(_ACTIVATIONS)}")
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"{source}: unsupported position_embedding_type {position_type!r} "
                             "(only 'absolute')")
        pad_token_id = int(raw.get("pad_token_id") or 0)
        return cls(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                   intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
                   num_attention_heads=raw["num_attention_heads"],
                   max_position_embeddings=raw["max_position_embeddings"],
                   type_vocab_size=int(raw.get("type_vocab_size", 2)),
                   layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)), hidden_act=act,
                   pad_token_id=pad_token_id, position_offset=0 if model_type == "bert" else pad_token_id + 1)

    @property
    def max_seq_length(self) -> int:
        """Longest input the position table covers (RoBERTa-likes lose pad_token_id + 1 positions)."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_file(cls, path: str | Path) -> "BertConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the model config ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, str(path))


class BertLayer(nn.Module):
    """Self-attention then MLP, each followed by residual add and LayerNorm (post-norm, as BERT)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(h, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, h)
        self.output_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, L, H]; attn_mask: [B, 1, 1, L] bool, True = a real key token."""
        b, length, h = x.shape
        qkv = self.qkv_proj(x).view(b, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                   # each [B, heads, L, D]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        attn = attn.transpose(1, 2).reshape(b, length, h)
        x = self.attn_norm(x + self.attn_out(attn))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class BertModel(nn.Module):
    """Token ids [B, L] + attention mask [B, L] -> last hidden states [B, L, H] (no pooler head)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, L] int64, right-padded; attention_mask: [B, L] (nonzero = real token)."""
        length = input_ids.shape[1]
        # NOTE: right-padded rows: real token i sits at position offset + i, which is what RoBERTa's
        # cumulative count of non-pad tokens gives too.
        positions = torch.arange(length, device=input_ids.device) + self.config.position_offset
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.embed_norm(x)
        # NOTE: padded query rows still see every real key, so no row is all -inf (no NaN); their
        # outputs are garbage that pooling masks out.
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy HF BertModel tensors (optional `bert.` / `roberta.` prefix) into ours, fusing query/key/value."""
        params = dict(self.named_parameters())
        loaded: dict[str, set[int]] = {}
        for name, tensor in weights:
            target, shard = _our_name(name.removeprefix("bert.").removeprefix("roberta."))
            param = params.get(target) if target else None
            if param is None:
                continue  # pooler, position_ids, MLM and classifier heads: not part of the encoder
            dst = param.data
            if shard is not None:
                size = self.config.hidden_size
                dst = dst.narrow(0, shard * size, size)
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"the config implies {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.setdefault(target, set()).add(shard or 0)
        for pname in params:
            if len(loaded.get(pname, ())) != (3 if ".qkv_proj." in pname else 1):
                raise ValueError(f"{source}: checkpoint lacks weights for {pname}")


# HF BERT name pieces -> ours (and the q/k/v shard they fill).
_EMBEDDINGS = {"embeddings.word_embeddings": "word_embeddings",
               "embeddings.position_embeddings": "position_embeddings",
               "embeddings.token_type_embeddings": "token_type_embeddings",
               "embeddings.LayerNorm": "embed_norm"}
_LAYER_PARTS = {"attention.self.query": ("qkv_proj", 0), "attention.self.key": ("qkv_proj", 1),
                "attention.self.value": ("qkv_proj", 2), "attention.output.dense": ("attn_out", None),
                "attention.output.LayerNorm": ("attn_norm", None),
                "intermediate.dense": ("intermediate", None), "output.dense": ("output", None),
                "output.LayerNorm": ("output_norm", None)}


def _our_name(name: str) -> tuple[str | None, int | None]:
    module, _, leaf = name.rpartition(".")
    leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)   # older TF-converted checkpoints
    if module in _EMBEDDINGS:
        return f"{_EMBEDDINGS[module]}.{leaf}", None
    if module.startswith("encoder.layer."):
        index, _, part = module.removeprefix("encoder.layer.").partition(".")
        if part in _LAYER_PARTS:
            ours, shard = _LAYER_PARTS[part]
            return f"layers.{index}.{ours}.{leaf}", shard
    return None, None
