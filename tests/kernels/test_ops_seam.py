"""kernels.triton_ops is a drop-in for kernels.reference: same names, same signatures, same answers at the seam."""
import inspect

import torch

from engine.attention import AttentionMetadata, PagedAttention
from kernels import reference as ref
from kernels import triton_ops


def test_every_twin_has_a_kernel_with_its_signature():
    twins = {name: fn for name, fn in vars(ref).items()
             if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == ref.__name__}
    assert {"rms_norm", "rotary_embedding", "silu_and_mul", "store_kv", "paged_decode_attention",
            "paged_prefill_attention", "sample_top_k_top_p"} <= set(twins)
    for name, twin in twins.items():
        kernel = getattr(triton_ops, name)
        assert list(inspect.signature(kernel).parameters) == list(inspect.signature(twin).parameters), name


def test_paged_attention_mixed_batch_store_then_attend(device):
    """The engine's layer call: store new K/V (one padded slot), then decode rows and an extend chunk."""
    torch.manual_seed(3)
    heads, kv_heads, d, bs = 6, 2, 64, 8
    caches = [torch.randn(24, bs, kv_heads, d, device=device) for _ in range(2)]
    tables = torch.randperm(24, device=device).view(4, 6)
    # decode rows: seqs 0, 1 (lengths 9, 1); padded row; prefill rows: seq 2 extends 5 tokens to 20, seq 3 new 3
    decode_lens, prefill_q, prefill_lens = [9, 1], [5, 3], [20, 3]
    slot = lambda seq, pos: int(tables[seq, pos // bs]) * bs + pos % bs   # noqa: E731
    slots = [slot(0, 8), slot(1, 0), -1] + [slot(2, p) for p in range(15, 20)] + [slot(3, p) for p in range(3)]
    t = len(slots)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device), num_decode_tokens=3,
        decode_block_tables=torch.cat([tables[:2], tables[:1]]),
        decode_context_lens=torch.tensor(decode_lens + [0], device=device), max_decode_context_len=9,
        prefill_cu_seqlens_q=torch.tensor([0, 5, 8], device=device),
        prefill_context_lens=torch.tensor(prefill_lens, device=device), prefill_block_tables=tables[2:],
        max_prefill_query_len=5, max_prefill_context_len=20)
    q, k, v = (torch.randn(t, n, d, device=device) for n in (heads, kv_heads, kv_heads))
    got_caches = [c.clone() for c in caches]
    got = PagedAttention(triton_ops, 0.125)(q, k, v, *got_caches, meta)
    want = PagedAttention(ref, 0.125)(q[:2], k[:2], v[:2], *caches, _without_padded_row(meta))
    want_prefill = PagedAttention(ref, 0.125)(q[3:], k[3:], v[3:], *caches, _prefill_only(meta))
    for got_cache, cache in zip(got_caches, caches):
        torch.testing.assert_close(got_cache, cache, rtol=0, atol=0)
    torch.testing.assert_close(got[:2], want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got[3:], want_prefill, rtol=2e-5, atol=2e-5)
    assert torch.equal(got[2], torch.zeros_like(got[2]))    # the padded row attends to nothing


def _without_padded_row(meta: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata(meta.slot_mapping[:2], 2, meta.decode_block_tables[:2], meta.decode_context_lens[:2],
                             9, meta.prefill_cu_seqlens_q[:1], meta.prefill_context_lens[:0],
                             meta.prefill_block_tables[:0], 0, 0)


def _prefill_only(meta: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata(meta.slot_mapping[3:], 0, meta.decode_block_tables[:0], meta.decode_context_lens[:0],
                             0, meta.prefill_cu_seqlens_q, meta.prefill_context_lens, meta.prefill_block_tables,
                             5, 20)
