"""Pure-torch twins of the Triton kernels: same signatures, the CPU path and the tests' reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm with an optional fused residual add.

    x: [T, H]; weight: [H]; residual: [T, H] or None.
    Returns (normed, new_residual) where new_residual = x + residual (or None when none was given).
    Computes in float32 and casts back before the weight multiply, as HF Llama does.
    """
    if residual is not None:
        x = x + residual
        residual = x
    if x.dtype == torch.float32:  # the fused op; bit-identical to the steps below in float32
        return torch.rms_norm(x, (x.shape[-1],), weight, eps), residual
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype), residual


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding.

    q: [T, num_heads, D]; k: [T, num_kv_heads, D]; positions: [T] int64;
    cos_sin_cache: [max_pos, D] float32 holding cos in [:, :D/2] and sin in [:, D/2:].
    Returns new q, k (same dtype).
    """
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions].unsqueeze(1)
    cos, sin = cs[..., :half].to(q.dtype), cs[..., half:].to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        # x * [cos, cos] + rotate_half(x) * [sin, sin], written per half (the same roundings).
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] (gate then up) -> silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new keys/values into the paged cache.

    k, v: [T, num_kv_heads, D]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, D];
    slot_mapping: [T] int64, slot = block * block_size + offset; -1 marks a padded row (skipped).
    """
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    # a cache of another dtype (float16 K/V beside float32 activations) stores the values rounded to it
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


def _gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_context_len: int) -> torch.Tensor:
    """[num_blocks, bs, kvh, D] x [B, M] -> [B, kvh, max_context_len, D] (positions past a row's
    context hold whatever the table's blocks hold; callers mask them)."""
    block_size = cache.shape[1]
    num_blocks_needed = (max_context_len + block_size - 1) // block_size
    blocks = cache[block_tables[:, :num_blocks_needed].clamp_min(0)]       # [B, nb, bs, kvh, D]
    b = blocks.shape[0]
    kv = blocks.reshape(b, num_blocks_needed * block_size, *cache.shape[2:])[:, :max_context_len]
    return kv.transpose(1, 2)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None) -> torch.Tensor:
    """One query token per sequence attending over its paged context.

    q: [B, num_heads, D]; block_tables: [B, max_blocks] int32/int64; context_lens: [B] (includes the
    current token, whose K/V is already stored). Returns [B, num_heads, D].
    """
    b, num_heads, d = q.shape
    if b == 0:
        return q.new_empty(q.shape)
    max_ctx = int(context_lens.max()) if max_context_len is None else max_context_len
    k = _gather_kv(k_cache, block_tables, max_ctx)                           # [B, kvh, L, D]
    v = _gather_kv(v_cache, block_tables, max_ctx)
    k, v = k.to(q.dtype), v.to(q.dtype)   # a float16 cache under float32 activations: widened exactly
    valid = torch.arange(max_ctx, device=q.device)[None, :] < context_lens[:, None]   # [B, L]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=valid[:, None, None, :],
                                         scale=scale, enable_gqa=True)               # [B, h, 1, D]
    return out.view(b, num_heads, d)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            block_tables: torch.Tensor, scale: float,
                            max_query_len: int | None = None,
                            max_context_len: int | None = None) -> torch.Tensor:
    """Causal attention for new tokens (a prompt chunk) over their sequence's paged context.

    q: [T, num_heads, D], sequences packed back to back; cu_seqlens_q: [B+1] offsets into q;
    context_lens: [B] total tokens per sequence including the new ones (their K/V already stored);
    block_tables: [B, max_blocks]. New token i of sequence b sits at position
    context_lens[b] - q_len[b] + i and sees keys 0..that position. Returns [T, num_heads, D].
    """
    t, num_heads, d = q.shape
    if t == 0:
        return q.new_empty(q.shape)
    cu = cu_seqlens_q.tolist()
    q_lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    b = len(q_lens)
    max_q = max(q_lens) if max_query_len is None else max_query_len
    max_ctx = int(context_lens.max()) if max_context_len is None else max_context_len
    k = _gather_kv(k_cache, block_tables, max_ctx)                           # [B, kvh, L, D]
    v = _gather_kv(v_cache, block_tables, max_ctx)
    kvh = k.shape[1]
    group = num_heads // kvh
    # Pad queries to [B, max_q]: index of each (row, i) into q, with row-local validity.
    q_len_t = torch.tensor(q_lens, device=q.device)
    offsets = torch.arange(max_q, device=q.device)
    q_valid = offsets[None, :] < q_len_t[:, None]                            # [B, max_q]
    q_index = (cu_seqlens_q[:-1, None].to(q.device) + offsets[None, :]).clamp_max(t - 1)
    qp = q[q_index]                                                          # [B, max_q, h, D]
    qp = qp.view(b, max_q, kvh, group, d).permute(0, 2, 3, 1, 4)             # [B, kvh, g, max_q, D]
    qpos = (context_lens[:, None] - q_len_t[:, None] + offsets[None, :])     # [B, max_q]
    kpos = torch.arange(max_ctx, device=q.device)
    allowed = kpos[None, None, :] <= qpos[:, :, None]                        # [B, max_q, L]
    scores = torch.matmul(qp.float(), k.float().unsqueeze(2).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))     # [B, kvh, g, max_q, L]
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float().unsqueeze(2))                        # [B, kvh, g, max_q, D]
    out = out.permute(0, 3, 1, 2, 4).reshape(b, max_q, num_heads, d)
    return out[q_valid].to(q.dtype)


def sample_top_k_top_p(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """Sample one token per row with temperature, top-k then top-p, and no host sync.

    logits: [B, V]; temperature: [B] (<= 0: greedy argmax of the raw logits); top_k: [B] int (<= 0 or
    >= V: off); top_p: [B] (>= 1: off); exponentials: [B, V] float32 Exp(1) draws (the randomness, so
    runs are reproducible). Tokens tied with a cut-off value are kept. Among the kept tokens of
    x = logits / temperature the row picks argmax(x - log E), i.e. argmax(p / E), an exact draw from the
    renormalised distribution; the first maximum wins ties. Returns [B] int64.
    """
    b, vocab = logits.shape
    is_sampled = temperature > 0
    x = logits.float() / torch.where(is_sampled, temperature.float(), 1.0)[:, None]
    desc = x.sort(dim=-1, descending=True).values
    k = torch.where((top_k > 0) & (top_k < vocab), top_k.long(), vocab)
    kth = desc.gather(1, (k - 1)[:, None])                                   # [B, 1]
    # top-p: keep the shortest prefix of the sorted survivors whose mass reaches top_p
    cumulative = desc.masked_fill(desc < kth, float("-inf")).softmax(dim=-1).cumsum(dim=-1)
    num_kept = ((cumulative < top_p.float()[:, None]).sum(dim=-1, keepdim=True) + 1).clamp(max=k[:, None])
    cut = torch.where((top_p < 1)[:, None], torch.maximum(kth, desc.gather(1, num_kept - 1)), kth)
    race = (x - exponentials.log()).masked_fill(x < cut, float("-inf"))
    return torch.where(is_sampled, race.argmax(dim=-1), logits.argmax(dim=-1))

