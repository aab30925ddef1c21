"""The CPU op set: the torch twins of kernels/reference.py, with C kernels (kernels/cpu_kernels.c) in
place of those whose torch form costs more in per-op overhead than in arithmetic at decode batch
sizes: paged decode attention (a gather of every sequence's K/V and a padded SDPA per layer), RMSNorm,
rotary embedding, SiLU-and-mul (several small ops each, per layer) and the K/V store (an index_copy with a
float16 cast, per layer). Prefill attention sums each score as the decode kernel does (a token's causal
context as its context length), over keys laid out 16 to a vector: a token's attention output is then the
same bits whether it was computed in a prompt chunk, as a decode step, or again after a preemption, so greedy
output does not depend on how the scheduler cut the work.
Same names and signatures as reference; float32 activations, K/V caches float32 or float16 (other dtypes and
layouts take the twins)."""
from __future__ import annotations

import ctypes

import torch

from kernels import reference
from kernels.reference import sample_top_k_top_p  # noqa: F401


# K/V cache dtypes the C attention reads (float16: half the memory a token, widened exactly when read)
KV_DTYPES = (torch.float32, torch.float16)


def reads_kv(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the C attention (and the fused decode stack) take this K/V cache."""
    return k_cache.dtype in KV_DTYPES and v_cache.dtype == k_cache.dtype


def _kv_half(cache: torch.Tensor) -> int:
    """The kernels' kv_half flag: 1 for a float16 cache, 0 for float32."""
    return int(cache.dtype == torch.float16)


def _library() -> ctypes.CDLL | None:
    from kernels.cpu_build import load_library
    return load_library()


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    lib = _library()
    t, num_kv_heads, d = k.shape
    # k and v are usually views into the qkv rows (or the rotary output): heads contiguous, rows strided
    if (lib is None or k.dtype != torch.float32 or v.dtype != torch.float32 or not reads_kv(k_cache, v_cache)
            or k.stride()[1:] != (d, 1) or v.stride()[1:] != (d, 1) or v.shape != k.shape
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape[2:] != k.shape[1:]):
        return reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.to(torch.int64).contiguous()
    if t:
        lib.llm_store_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), t, num_kv_heads * d, slots.data_ptr(),
                         k_cache.data_ptr(), v_cache.data_ptr(), _kv_half(k_cache))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    lib = _library()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or weight.dtype != torch.float32:
        return reference.rms_norm(x, weight, eps, residual)
    x = x.contiguous()
    out = torch.empty_like(x)
    residual_out = None
    if residual is not None:
        residual = residual.contiguous()
        residual_out = torch.empty_like(x)
    lib.llm_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
                     x.shape[0], x.shape[1], out.data_ptr(), None if residual_out is None else residual_out.data_ptr())
    return out, residual_out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None) -> torch.Tensor:
    lib = _library()
    if lib is None or q.dtype != torch.float32 or not reads_kv(k_cache, v_cache):
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                max_context_len)
    b, num_heads, d = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    if b:
        lib.llm_paged_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                       tables.shape[1], lens.data_ptr(), b, num_heads, num_kv_heads, d,
                                       block_size, scale, _kv_half(k_cache), out.data_ptr())
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            block_tables: torch.Tensor, scale: float,
                            max_query_len: int | None = None,
                            max_context_len: int | None = None) -> torch.Tensor:
    """reference.paged_prefill_attention's contract: token i of a sequence with q_len new tokens and context_len in
    all attends to context_len - q_len + i + 1 keys, each token's output the bits its own decode step gives."""
    lib = _library()
    if lib is None or q.dtype != torch.float32 or not reads_kv(k_cache, v_cache) or q.shape[0] == 0:
        return reference.paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                                 scale, max_query_len, max_context_len)
    s = context_lens.shape[0]
    _, block_size, num_kv_heads, d = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    q = q.contiguous()
    cu = cu_seqlens_q.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    lib.llm_paged_prefill_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                    tables.shape[1], cu.data_ptr(), lens.data_ptr(), s, q.shape[1], num_kv_heads, d,
                                    block_size, scale, _kv_half(k_cache), out.data_ptr())
    return out


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _library()
    t, num_heads, d = q.shape
    num_kv_heads = k.shape[1]
    # q and k are usually views into the fused qkv rows: heads contiguous inside a row, rows strided.
    if (lib is None or q.dtype != torch.float32 or k.dtype != torch.float32 or cos_sin_cache.dtype != torch.float32
            or q.stride()[1:] != (d, 1) or k.stride()[1:] != (d, 1) or d % 2):
        return reference.rotary_embedding(q, k, positions, cos_sin_cache)
    cos_sin = cos_sin_cache.contiguous()
    pos = positions.to(torch.int64).contiguous()
    q_out, k_out = q.new_empty(q.shape), k.new_empty(k.shape)
    if t:
        lib.llm_rotary_embedding(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), pos.data_ptr(),
                                 cos_sin.data_ptr(), t, num_heads, num_kv_heads, d, q_out.data_ptr(),
                                 k_out.data_ptr())
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    lib = _library()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2:
        return reference.silu_and_mul(x)
    x = x.contiguous()
    out = x.new_empty((x.shape[0], x.shape[1] // 2))
    lib.llm_silu_and_mul(x.data_ptr(), x.shape[0], x.shape[1] // 2, out.data_ptr())
    return out


# -- the whole decoder stack of a decode step in one call (kernels/cpu_layers.c) ------------------------

class _PackedWeight(ctypes.Structure):
    """NOTE: mirrors llm_packed_weight in kernels/cpu_layers.c."""
    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("bits", ctypes.c_int64), ("group", ctypes.c_int64), ("out_features", ctypes.c_int64),
                ("in_features", ctypes.c_int64), ("int8_activations", ctypes.c_int64),
                ("half_scales", ctypes.c_int64), ("offset", ctypes.c_int64)]


class _DecoderLayer(ctypes.Structure):
    """NOTE: mirrors llm_decoder_layer in kernels/cpu_layers.c."""
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("qkv_bias", ctypes.c_void_p), ("qkv", _PackedWeight),
                ("o", _PackedWeight), ("gate_up", _PackedWeight), ("down", _PackedWeight)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _packed(w) -> _PackedWeight:
    """A kernels.cpu_quant.PackedWeight as quant_matmul hands it to the kernels."""
    return _PackedWeight(w.data.data_ptr(), w.scale.data_ptr(), _ptr(w.zero), w.bits, w.group, w.out_features,
                         w.in_features, w.activations == "int8", w.scale.dtype == torch.float16, w.offset)


class DecodeStack:
    """One model's decoder layers as llm_decode_stack takes them: weight pointers gathered once (the weights
    never move after load), scratch for up to max_rows rows. Holds the tensors it points into.

    layers: DecoderLayer modules whose four projections are packed (module.packed), all float32; final_norm: the
    model's last RMSNorm (float32), run in the same call, or None."""

    def __init__(self, layers, max_rows: int, final_norm=None):
        first = layers[0].self_attn
        self.num_layers, self.max_rows = len(layers), max_rows
        self.hidden = layers[0].input_layernorm.weight.shape[0]
        self.num_heads, self.num_kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.intermediate = layers[0].mlp.down_proj.packed.in_features
        self.eps, self.scale = layers[0].input_layernorm.eps, first.attn.scale
        structs, self._keep = [], []
        xsum_per_row = 0
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            weights = [attn.qkv_proj.packed, attn.o_proj.packed, mlp.gate_up_proj.packed, mlp.down_proj.packed]
            xsum_per_row = max(xsum_per_row, *(w.in_features // w.group for w in weights))
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                     None if attn.q_norm is None else attn.q_norm.weight,
                     None if attn.k_norm is None else attn.k_norm.weight, attn.qkv_proj.bias]
            self._keep += weights + norms
            structs.append(_DecoderLayer(*(_ptr(t) for t in norms), *map(_packed, weights)))
        self.layers = (_DecoderLayer * len(structs))(*structs)
        self.final_norm = final_norm
        self._lib = lib = _library()
        floats = lib.llm_decode_stack_scratch_floats(max_rows, self.hidden, self.num_heads, self.num_kv_heads,
                                                     self.head_dim, self.intermediate, xsum_per_row)
        self.scratch = torch.empty(floats, dtype=torch.float32)
        self._caches: tuple[object, ctypes.Array, ctypes.Array] | None = None

    def _cache_pointers(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[ctypes.Array, ctypes.Array]:
        # The runner hands the same list every step: its pointers are gathered once (the list is kept, so
        # its id is not reused).
        if self._caches is None or self._caches[0] is not kv_caches:
            array = ctypes.c_void_p * self.num_layers
            self._caches = (kv_caches, array(*(k.data_ptr() for k, _ in kv_caches)),
                            array(*(v.data_ptr() for _, v in kv_caches)))
        return self._caches[1], self._caches[2]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, hidden] embeddings of B decode rows -> (the last layer's output, its residual), both [B, hidden],
        as DecoderLayer.forward returns them; with a final_norm, (its output, the residual sum), as
        final_norm(output, residual) returns them."""
        b = x.shape[0]
        assert 0 < b <= self.max_rows and len(kv_caches) == self.num_layers
        k_cache = kv_caches[0][0]
        assert reads_kv(k_cache, kv_caches[0][1]) and k_cache.is_contiguous()
        x = x.contiguous()
        pos, slots = positions.to(torch.int64).contiguous(), slot_mapping.to(torch.int64).contiguous()
        tables, lens = block_tables.to(torch.int64).contiguous(), context_lens.to(torch.int64).contiguous()
        cos_sin = cos_sin.contiguous()
        k_ptrs, v_ptrs = self._cache_pointers(kv_caches)
        out, residual = torch.empty_like(x), torch.empty_like(x)
        self._lib.llm_decode_stack(
            self.layers, self.num_layers, b, self.hidden, self.num_heads, self.num_kv_heads, self.head_dim,
            self.intermediate, self.eps, self.scale, x.data_ptr(), pos.data_ptr(), cos_sin.data_ptr(),
            slots.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(), k_ptrs, v_ptrs,
            _kv_half(k_cache), k_cache.shape[1], self.scratch.data_ptr(), out.data_ptr(),
            residual.data_ptr(), None if self.final_norm is None else self.final_norm.weight.data_ptr(),
            0.0 if self.final_norm is None else self.final_norm.eps)
        return out, residual
