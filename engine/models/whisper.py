"""Whisper: a conv-stem transformer encoder over log-mel frames, and a decoder whose self-attention runs over
our paged KV cache and whose cross-attention reads the encoder states of its row's window."""
from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, PagedAttention
from engine.models.layers import linear
from engine.models.whisper_config import WhisperConfig


class _LayerNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.bias = nn.Parameter(torch.empty(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


class _MLP(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.gelu(linear(x, self.fc1)), self.fc2)


class EncoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        d = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.self_attn_layer_norm = _LayerNorm(d)
        self.qkv_proj = nn.Linear(d, 3 * d)          # q, k, v fused (k has no bias in the checkpoint: zeros)
        self.out_proj = nn.Linear(d, d)
        self.final_layer_norm = _LayerNorm(d)
        self.mlp = _MLP(d, config.encoder_ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, d] -> [B, S, d]."""
        b, s, d = x.shape
        h = self.num_heads
        q, k, v = linear(self.self_attn_layer_norm(x), self.qkv_proj).split(d, dim=-1)
        q, k, v = (t.reshape(b, s, h, d // h).transpose(1, 2) for t in (q, k, v))
        # HF scales q after the projection (bias included); the same order keeps the sums alike.
        attn = F.scaled_dot_product_attention(q * (d // h) ** -0.5, k, v, scale=1.0)
        x = x + linear(attn.transpose(1, 2).reshape(b, s, d), self.out_proj)
        return x + self.mlp(self.final_layer_norm(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig, ops: ModuleType):
        super().__init__()
        d = config.d_model
        self.num_heads, self.head_dim = config.decoder_attention_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        self.self_attn_layer_norm = _LayerNorm(d)
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.encoder_attn_layer_norm = _LayerNorm(d)
        self.cross_q_proj = nn.Linear(d, d)
        self.cross_kv_proj = nn.Linear(d, 2 * d)     # applied once per window to the encoder states
        self.cross_out_proj = nn.Linear(d, d)
        self.final_layer_norm = _LayerNorm(d)
        self.mlp = _MLP(d, config.decoder_ffn_dim)
        self.attn = PagedAttention(ops, scale=1.0)   # q comes pre-scaled, as in HF

    def cross_kv(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder_states [S, d] -> (k, v) [h, S, D] each."""
        s = encoder_states.shape[0]
        k, v = linear(encoder_states, self.cross_kv_proj).split(self.num_heads * self.head_dim, dim=-1)
        return (k.reshape(s, self.num_heads, self.head_dim).transpose(0, 1).contiguous(),
                v.reshape(s, self.num_heads, self.head_dim).transpose(0, 1).contiguous())

    def forward(self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                row_lens: list[int], row_cross: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x: [T, d], rows packed as meta says (decode rows first); row_cross[i]: row i's (k, v) for this layer."""
        t, d = x.shape
        h, hd = self.num_heads, self.head_dim
        q, k, v = linear(self.self_attn_layer_norm(x), self.qkv_proj).split(d, dim=-1)
        q = (q * self.scale).reshape(t, h, hd)
        out = self.attn(q, k.reshape(t, h, hd), v.reshape(t, h, hd), kv_cache[0], kv_cache[1], meta)
        x = x + linear(out.reshape(t, d), self.out_proj)
        cq = (linear(self.encoder_attn_layer_norm(x), self.cross_q_proj) * self.scale).reshape(t, h, hd)
        parts, start = [], 0
        for n, (ck, cv) in zip(row_lens, row_cross):
            # One row at a time: each attends to its own window, and the windows' K/V stay unstacked
            # (stacking would copy every active row's [h, S, D] per layer per step).
            # NOTE: 4-D inputs: torch's CPU SDPA takes a path ~8x slower for 3-D ones (1.4 against 0.18 ms at
            # tiny's [6, 1500, 64] per layer and row, measured on the dev CPU)
            qi = cq[start:start + n].transpose(0, 1)[None]                 # [1, h, n, D]
            attn = F.scaled_dot_product_attention(qi, ck[None], cv[None], scale=1.0)
            parts.append(attn[0].transpose(0, 1))
            start += n
        cross = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        x = x + linear(cross.reshape(t, d), self.cross_out_proj)
        return x + self.mlp(self.final_layer_norm(x))


class WhisperModel(nn.Module):
    """Encoder and decoder; the runner (engine/speech_core.py) owns the KV cache and the windows."""

    def __init__(self, config: WhisperConfig, ops: ModuleType):
        super().__init__()
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.encoder_positions = nn.Parameter(torch.empty(config.max_source_positions, d))
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.encoder_norm = _LayerNorm(d)
        self.embed_tokens = nn.Embedding(config.vocab_size, d, _weight=torch.empty(config.vocab_size, d))
        self.decoder_positions = nn.Parameter(torch.empty(config.max_target_positions, d))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config, ops) for _ in range(config.decoder_layers))
        self.decoder_norm = _LayerNorm(d)

    @property
    def num_frames(self) -> int:
        """Mel frames per window the encoder takes (3000: 30 s)."""
        return 2 * self.config.max_source_positions

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, 3000] -> encoder states [B, 1500, d]."""
        assert mel.shape[1:] == (self.config.num_mel_bins, self.num_frames), mel.shape
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.encoder_positions
        for layer in self.encoder_layers:
            x = layer(x)
        return self.encoder_norm(x)

    def cross_kv(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One window's encoder states [S, d] -> per decoder layer (k, v) [h, S, D]: computed once per window."""
        return [layer.cross_kv(encoder_states) for layer in self.decoder_layers]

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
               meta: AttentionMetadata, row_lens: list[int],
               row_cross: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
        """input_ids, positions [T] (rows packed, decode rows first) -> final hidden states [T, d].
        row_cross[i] is row i's window's cross_kv()."""
        assert sum(row_lens) == input_ids.shape[0] and len(row_lens) == len(row_cross)
        x = self.embed_tokens(input_ids) + self.decoder_positions[positions]
        for i, (layer, kv_cache) in enumerate(zip(self.decoder_layers, kv_caches)):
            x = layer(x, kv_cache, meta, row_lens, [cross[i] for cross in row_cross])
        return self.decoder_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, d] -> [N, vocab] float32 (the output projection is tied to the token embeddings)."""
        return F.linear(hidden, self.embed_tokens.weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy HF-named tensors (WhisperForConditionalGeneration's state dict) into our fused parameters."""
        params = dict(self.named_parameters())
        filled: dict[str, int] = {}
        d = self.config.d_model
        for name, tensor in weights:
            for dst_name, rows in _targets(name.removeprefix("model."), d):
                param = params.get(dst_name)
                if param is None:
                    raise ValueError(f"{source}: unexpected tensor {name}")
                dst = param.data if rows is None else param.data[rows[0]:rows[1]]
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                                     f"the config implies {tuple(dst.shape)}")
                dst.copy_(tensor)
                filled[dst_name] = filled.get(dst_name, 0) + (dst.shape[0] if rows is None else rows[1] - rows[0])
        for pname, param in params.items():
            # a fused k bias is absent from checkpoints (Whisper's k projections have none): zeros
            want = param.shape[0]
            if pname.endswith(("qkv_proj.bias", "cross_kv_proj.bias")):
                _zero_k_bias(param, filled.get(pname, 0), d, pname, source)
                continue
            if filled.get(pname, 0) != want:
                raise ValueError(f"{source}: checkpoint lacks weights for {pname}")


def _zero_k_bias(param: nn.Parameter, num_filled: int, d: int, pname: str, source: str) -> None:
    k_rows = (d, 2 * d) if "qkv_proj" in pname else (0, d)
    if num_filled != param.shape[0] - d:
        raise ValueError(f"{source}: checkpoint lacks bias for {pname}")
    param.data[k_rows[0]:k_rows[1]].zero_()


def _targets(name: str, d: int) -> list[tuple[str, tuple[int, int] | None]]:
    """Where one HF tensor goes: [(our parameter, rows or None for all)]; [] for a tensor we do not use."""
    if name == "proj_out.weight":
        return []   # tied to the decoder's token embeddings
    part, _, rest = name.partition(".")
    if part == "encoder":
        if rest.startswith("layers."):
            return [(f"encoder_layers.{_layer_name(rest.removeprefix('layers.'), d, encoder=True)[0]}",
                     _layer_name(rest.removeprefix("layers."), d, encoder=True)[1])]
        fixed = {"conv1.weight": "conv1.weight", "conv1.bias": "conv1.bias", "conv2.weight": "conv2.weight",
                 "conv2.bias": "conv2.bias", "embed_positions.weight": "encoder_positions",
                 "layer_norm.weight": "encoder_norm.weight", "layer_norm.bias": "encoder_norm.bias"}
    elif part == "decoder":
        if rest.startswith("layers."):
            target, rows = _layer_name(rest.removeprefix("layers."), d, encoder=False)
            return [(f"decoder_layers.{target}", rows)]
        fixed = {"embed_tokens.weight": "embed_tokens.weight", "embed_positions.weight": "decoder_positions",
                 "layer_norm.weight": "decoder_norm.weight", "layer_norm.bias": "decoder_norm.bias"}
    else:
        fixed = {}
    if rest not in fixed:
        raise ValueError(f"unexpected Whisper tensor {name}")
    return [(fixed[rest], None)]


_SHARDS = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _layer_name(rest: str, d: int, encoder: bool) -> tuple[str, tuple[int, int] | None]:
    """'3.self_attn.k_proj.weight' -> ('3.qkv_proj.weight', (d, 2d)); other names map one to one."""
    index, _, local = rest.partition(".")
    module, _, tail = local.partition(".")            # tail: 'k_proj.weight' or 'weight'
    if module in ("self_attn", "encoder_attn"):
        proj, _, kind = tail.partition(".")
        if proj == "out_proj":
            return f"{index}.{'out_proj' if module == 'self_attn' else 'cross_out_proj'}.{kind}", None
        shard = _SHARDS[proj]
        if module == "self_attn":
            return f"{index}.qkv_proj.{kind}", (shard * d, (shard + 1) * d)
        if encoder:
            raise ValueError(f"unexpected Whisper encoder tensor layers.{rest}")
        if shard == 0:
            return f"{index}.cross_q_proj.{kind}", None
        return f"{index}.cross_kv_proj.{kind}", ((shard - 1) * d, shard * d)
    if module in ("fc1", "fc2"):
        return f"{index}.mlp.{module}.{tail}", None
    if module in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
        return f"{index}.{module}.{tail}", None
    raise ValueError(f"unexpected Whisper tensor layers.{rest}")
