"""Llama family decoder (Llama 2/3, Mistral, SmolLM): embeddings, N decoder layers, final norm, LM head."""
from __future__ import annotations

import os
from collections.abc import Iterable
from types import ModuleType

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.multimodal import MultimodalInputs
from engine.models.layers import QUANT_MAX_ROWS, MLP, Attention, DecoderLayer, RMSNorm, linear, rope_cos_sin_cache
from engine.models.parallel import SINGLE, TensorParallel, shard_quantized, shard_tensor
from kernels import cpu_ops
from kernels.cpu_quant import QuantizedTensor, cat_rows, pack
from kernels.packed_rows import packed_rows

# Checkpoint projection name -> (our fused parameter, shard index). Fusing at load time turns three
# (or two) matmuls per layer into one.
FUSED_SHARDS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}

FUSED_DECODE_ENV = "LLM_FUSED_DECODE"   # "0": decode steps run the layers one op at a time (tests, benchmarks)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, ops: ModuleType, max_positions: int, tp: TensorParallel = SINGLE):
        """tp: this rank's place; its layers hold their slice of the heads and of the MLP (parallel.py)."""
        super().__init__()
        self.config = config
        self.tp = tp
        # NOTE: _weight skips the random init: normal_ on the meta device imports torch._dynamo (~1 s of
        # startup); the loader fills every parameter anyway.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, ops, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        cos_sin = torch.empty(max_positions, config.head_dim)
        if not cos_sin.is_meta:  # on meta (the loader's build) it is computed for real after loading
            cos_sin = rope_cos_sin_cache(config.head_dim, config.rope_theta, config.rope_scaling, max_positions)
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)
        # Small CPU decode batches run the whole layer stack in one C call (kernels/cpu_layers.c): at batch 1
        # the ~10 per-layer ops cost more in call overhead than in arithmetic. Same kernels, same order, so
        # the same bits as the loop. fused_decode may be flipped at any time; _decode_stack is built on first use.
        self.fused_decode = os.environ.get(FUSED_DECODE_ENV, "1") != "0"
        self._decode_stack: cpu_ops.DecodeStack | None | bool = None   # False: this model cannot take it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                mm: MultimodalInputs | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, H].

        mm: a vision-language model's image embeddings, written over their placeholder tokens' embeddings,
        and its rotary positions (rotary_table)."""
        x = self.embed(input_ids)
        cos_sin = self.cos_sin_cache
        if mm is not None:
            if mm.embeds.shape[0]:
                x = x.index_copy(0, mm.embed_indices, mm.embeds.to(x.dtype))
            if mm.mrope_positions is not None:
                cos_sin, positions = self.rotary_table(mm.mrope_positions)
        stack = self._fused_stack(x, meta, kv_caches) if mm is None and self.fused_decode else None
        if stack is not None:
            x, residual = stack(x, positions, cos_sin, kv_caches, meta.slot_mapping, meta.decode_block_tables,
                                meta.decode_context_lens)
            if stack.final_norm is not None:   # computed in the same call
                return x
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches):
                x, residual = layer.forward(positions, x, residual, cos_sin, kv_cache, meta)
        x, _ = self.norm.forward(x, residual)
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; read from the packed table where the loader kept no float32 one (equal rows)."""
        if self.embed_tokens.weight is None:
            return packed_rows(self.embed_tokens.packed, input_ids)
        return self.embed_tokens(input_ids)

    def _fused_stack(self, x: torch.Tensor, meta: AttentionMetadata,
                     kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> cpu_ops.DecodeStack | None:
        """The one-call decoder stack, where it computes exactly what the layer loop would: a decode-only
        batch small enough for the packed kernels (linear() picks them up to QUANT_MAX_ROWS rows), over a
        K/V cache the C attention reads."""
        t = x.shape[0]
        if not (0 < t <= QUANT_MAX_ROWS and meta.num_decode_tokens == t and x.dtype == torch.float32
                and x.device.type == "cpu" and kv_caches and cpu_ops.reads_kv(*kv_caches[0])):
            return None
        if self._decode_stack is None:
            norm = self.norm   # the final norm in the same call, where it is one the kernels compute alike
            fused_norm = type(norm) is RMSNorm and norm.ops is cpu_ops and norm.weight.dtype == torch.float32 \
                and norm.weight.device.type == "cpu"
            self._decode_stack = self._can_fuse() and cpu_ops.DecodeStack(self.layers, QUANT_MAX_ROWS,
                                                                          norm if fused_norm else None)
        return self._decode_stack or None

    def _can_fuse(self) -> bool:
        """Whether every layer runs the C kernels on packed weights in float32 (what the stack assumes)."""
        from kernels.cpu_build import load_library
        if self.tp.size != 1 or load_library() is None or self.cos_sin_cache.dtype != torch.float32:
            return False
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = [n for n in (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm)
                     if n is not None]
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not (type(layer) is DecoderLayer and type(attn) is Attention and type(mlp) is MLP
                    and all(m.ops is cpu_ops for m in (attn, mlp, *norms)) and attn.head_dim % 2 == 0
                    and all(getattr(p, "packed", None) is not None for p in projections)
                    and all(p.bias is None for p in projections[1:])):
                return False
            if any(t.dtype != torch.float32 or t.device.type != "cpu"
                   for t in [n.weight for n in norms] + [attn.qkv_proj.bias] if t is not None):
                return False
        return True

    def rotary_table(self, mrope_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multimodal rotary (Qwen2-VL): a per-token cos/sin table [T, D] and the positions into it (0..T-1),
        so the one rotary kernel serves both. Families without it never get mrope_positions."""
        raise NotImplementedError(f"{type(self).__name__} has no multimodal rotary positions")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.embed_tokens if self.lm_head is None else self.lm_head).float()

    def load_quantized(self, weights: Iterable[tuple[str, QuantizedTensor]]) -> int:
        """Attach packed integer weights (`module.packed`) beside the float ones, for the quantized
        CPU kernel; a fused projection gets them only when every shard came (and, with tensor parallel,
        when this rank's slice of each is whole quantization groups). Returns bytes packed."""
        modules = dict(self.named_modules())
        shards: dict[str, dict[int, QuantizedTensor]] = {}
        for name, w in weights:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            target, shard = name, 0
            for ckpt_name, (fused, index) in FUSED_SHARDS.items():
                if f".{ckpt_name}." in name:
                    target, shard = name.replace(ckpt_name, fused), index
                    break
            if target.removesuffix(".weight") in modules:
                w = shard_quantized(name, w, self.config, self.tp)
                if w is not None:
                    shards.setdefault(target.removesuffix(".weight"), {})[shard] = w
        num_bytes = 0
        for module_name, parts in shards.items():
            module = modules[module_name]
            num_shards = 3 if module_name.endswith("qkv_proj") else 2 if module_name.endswith("gate_up_proj") else 1
            if len(parts) != num_shards:
                continue  # a shard of a type the kernel lacks (F16, Q3_K ...): this projection stays float32
            packed = pack(cat_rows([parts[i] for i in range(num_shards)]))
            if (packed.out_features, packed.in_features) != tuple(module.weight.shape):
                raise ValueError(f"quantized {module_name} has shape {(packed.out_features, packed.in_features)}, "
                                 f"the config implies {tuple(module.weight.shape)}")
            module.packed = packed
            num_bytes += packed.num_bytes
        return num_bytes

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy checkpoint tensors (HF names) into our parameters, fusing q/k/v and gate/up."""
        params = dict(self.named_parameters())
        loaded: dict[str, set[int]] = {}
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, shard = name, None
            for ckpt_name, (fused, index) in FUSED_SHARDS.items():
                if f".{ckpt_name}." in name:
                    target, shard = name.replace(ckpt_name, fused), index
                    break
            param = params.get(target)
            if param is None:
                continue  # extra tensors (e.g. unused heads) are not an error
            dst = param.data if shard is None else self._shard(target, param.data, shard)
            _copy(dst, shard_tensor(name, tensor, self.config, self.tp), source, name)
            loaded.setdefault(target, set()).add(shard or 0)
        for pname in params:
            num_shards = 3 if ".qkv_proj." in pname else 2 if ".gate_up_proj." in pname else 1
            if len(loaded.get(pname, ())) != num_shards:
                raise ValueError(f"{source}: checkpoint lacks weights for {pname}")

    def _shard(self, target: str, data: torch.Tensor, shard: int) -> torch.Tensor:
        c, tp = self.config, self.tp
        if "qkv_proj" in target:
            q, kv = tp.num_heads(c) * c.head_dim, tp.num_kv_heads(c) * c.head_dim
            sizes = [q, kv, kv]
        else:
            sizes = [tp.intermediate_size(c)] * 2
        start = sum(sizes[:shard])
        return data.narrow(0, start, sizes[shard])


def _copy(dst: torch.Tensor, src: torch.Tensor, source: str, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{source}: tensor {name} has shape {tuple(src.shape)}, "
                         f"the config implies {tuple(dst.shape)}")
    dst.copy_(src)
