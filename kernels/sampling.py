"""Top-k / top-p sampling with no host sync: one program per row finds both cut-offs by bisection over the
row (no sort), then races the kept tokens with the caller's exponential noise: argmax(p / E).

Cut-offs are exact values, not approximations: the bisection runs over the order-preserving int32 image of
each float32 logit, 32 halvings of the int32 range. Cost: up to ~67 passes over the row (1 for the max,
32 for top-k, 33 for top-p, 1 to pick); rows without top-k / top-p skip those passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024


@triton.jit
def _ordered_key(x):
    """float32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _scaled(row_ptr, v, vocab, temperature):
    # an IEEE division (round to nearest), as the twin does: Triton's `/` on float32 is an approximation on
    # the GPU, and x * (1 / t) rounds differently too; either can move a cut-off
    return tl.math.div_rn(tl.load(row_ptr + v, mask=v < vocab, other=float("-inf")).to(tl.float32), temperature)


@triton.jit
def _sample_kernel(
    logits_ptr,        # [B, V] at stride_l, any float dtype
    noise_ptr,         # [B, V] float32 Exp(1) draws at stride_e
    temperature_ptr,   # [B] float32; <= 0 means greedy
    top_k_ptr,         # [B] int; <= 0 or >= V means off
    top_p_ptr,         # [B] float32; >= 1 means off
    out_ptr,           # [B] int64
    stride_l, stride_e, vocab,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_l
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row).to(tl.int32)
    top_p = tl.load(top_p_ptr + row)
    is_sampled = temperature > 0.0
    safe_temp = tl.where(is_sampled, temperature, 1.0)
    offs = tl.arange(0, BLOCK)

    # the row max: the softmax shift, and the upper end of both searches
    x_max = tl.full([], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        x_max = tl.maximum(x_max, tl.max(_scaled(logits_row, start + offs, vocab, safe_temp), axis=0))

    # top-k: the largest key t with #{key >= t} >= k is exactly the k-th largest value's key
    k_cut = tl.full([], -2147483648, tl.int32)
    if is_sampled & (top_k > 0) & (top_k < vocab):
        lo = tl.full([], -2147483648, tl.int64)                # #{key >= lo} = V >= k
        hi = _ordered_key(x_max).to(tl.int64) + 1               # #{key >= hi} = 0 < k
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            count = tl.full([], 0, tl.int32)
            for start in range(0, vocab, BLOCK):
                v = start + offs
                key = _ordered_key(_scaled(logits_row, v, vocab, safe_temp)).to(tl.int64)
                count += tl.sum(((key >= mid) & (v < vocab)).to(tl.int32), axis=0)
            is_enough = count >= top_k
            lo = tl.where(is_enough, mid, lo)
            hi = tl.where(is_enough, hi, mid)
        k_cut = lo.to(tl.int32)

    # top-p over the top-k survivors: the largest key t whose mass {key >= t} reaches top_p
    p_cut = k_cut
    if is_sampled & (top_p < 1.0):
        total = tl.full([], 0.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            x = _scaled(logits_row, start + offs, vocab, safe_temp)
            total += tl.sum(tl.where(_ordered_key(x) >= k_cut, tl.exp(x - x_max), 0.0), axis=0)
        lo = k_cut.to(tl.int64)                 # mass(lo) = total >= top_p * total
        hi = _ordered_key(x_max).to(tl.int64) + 1               # mass(hi) = 0
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            mass = tl.full([], 0.0, tl.float32)
            for start in range(0, vocab, BLOCK):
                x = _scaled(logits_row, start + offs, vocab, safe_temp)
                mass += tl.sum(tl.where(_ordered_key(x).to(tl.int64) >= mid, tl.exp(x - x_max), 0.0), axis=0)
            is_enough = mass >= top_p * total
            lo = tl.where(is_enough, mid, lo)
            hi = tl.where(is_enough, hi, mid)
        p_cut = lo.to(tl.int32)

    # the race: argmax(x - log E) over kept tokens (greedy rows: argmax x); the first maximum wins
    best = tl.full([], float("-inf"), tl.float32)
    best_id = tl.full([], 0, tl.int64)
    for start in range(0, vocab, BLOCK):
        v = start + offs
        x = _scaled(logits_row, v, vocab, safe_temp)
        if is_sampled:
            noise = tl.load(noise_ptr + row * stride_e + v, mask=v < vocab, other=1.0)
            x = tl.where(_ordered_key(x) >= p_cut, x - tl.log(noise), float("-inf"))
        x = tl.where(v < vocab, x, float("-inf"))
        tile_best = tl.max(x, axis=0)
        tile_id = tl.min(tl.where(x == tile_best, v, vocab), axis=0).to(tl.int64)
        is_better = tile_best > best
        best_id = tl.where(is_better, tile_id, best_id)
        best = tl.where(is_better, tile_best, best)
    tl.store(out_ptr + row, best_id)


def sample_top_k_top_p(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.reference.sample_top_k_top_p: [B] int64 token ids, no host sync."""
    batch, vocab = logits.shape
    assert exponentials.shape == logits.shape and exponentials.dtype == torch.float32
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if exponentials.stride(-1) != 1:
        exponentials = exponentials.contiguous()
    _sample_kernel[(batch,)](logits, exponentials, temperature.float(), top_k, top_p.float(), out,
                             logits.stride(0), exponentials.stride(0), vocab,
                             BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8)
    return out
