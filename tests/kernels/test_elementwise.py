"""RMSNorm, rotary, SiLU-and-mul and the paged KV store against their torch twins (odd shapes, strided inputs)."""
import pytest
import torch

from kernels import reference as ref
from kernels.activation import silu_and_mul
from kernels.kv_store import store_kv
from kernels.rms_norm import rms_norm
from kernels.rotary import rotary_embedding

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _cos_sin(max_pos: int, head_dim: int, device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = torch.arange(max_pos, device=device).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


@pytest.mark.parametrize("hidden", [96, 80, 33])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, hidden, with_residual):
    torch.manual_seed(hidden)
    wide = torch.randn(7, hidden + 5, device=device)
    x = wide[:, 2:hidden + 2]                        # rows at a stride wider than the row
    residual = torch.randn(7, hidden, device=device) if with_residual else None
    weight = torch.randn(hidden, device=device)
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    want, want_res = ref.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if with_residual:
        torch.testing.assert_close(new_res, want_res, rtol=0, atol=0)
    else:
        assert new_res is None


@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("num_kv_heads", [2, 3])
def test_rotary_strided_qkv(device, head_dim, num_kv_heads):
    torch.manual_seed(head_dim + num_kv_heads)
    t, num_heads = 9, 6
    qkv = torch.randn(t, (num_heads + 2 * num_kv_heads) * head_dim, device=device)
    # as the model makes them: views of one fused projection, not contiguous per tensor
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.reshape(t, num_heads, head_dim), k.reshape(t, num_kv_heads, head_dim)
    assert not q.is_contiguous()
    cos_sin = _cos_sin(100, head_dim, device)
    positions = torch.tensor([0, 3, 99, 1, 50, 50, 7, 2, 64], device=device)
    q_out, k_out = rotary_embedding(q, k, positions, cos_sin)
    q_want, k_want = ref.rotary_embedding(q, k, positions, cos_sin)
    torch.testing.assert_close(q_out, q_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out, k_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_rounds_like_hf_llama(device, dtype):
    """bf16/fp16: bit for bit the twin and transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb (cos/sin
    cast to the dtype, each product and sum rounded to it)."""
    tf = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from engine.models.layers import rope_cos_sin_cache
    torch.manual_seed(7)
    t, num_heads, num_kv_heads, head_dim = 9, 6, 3, 80
    config = tf.LlamaConfig(hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                            num_key_value_heads=num_kv_heads, max_position_embeddings=4096, rope_theta=500000.0)
    q = torch.randn(t, num_heads, head_dim, device=device).to(dtype)
    k = torch.randn(t, num_kv_heads, head_dim, device=device).to(dtype)
    positions = torch.tensor([0, 3, 4095, 1, 50, 50, 7, 2, 1000], device=device)
    cos_sin = rope_cos_sin_cache(head_dim, 500000.0, None, 4096).to(device)
    q_out, k_out = rotary_embedding(q, k, positions, cos_sin)
    q_twin, k_twin = ref.rotary_embedding(q, k, positions, cos_sin)
    cos, sin = LlamaRotaryEmbedding(config).to(device)(q, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    for got, twin, hf in ((q_out, q_twin, q_hf), (k_out, k_twin, k_hf)):
        assert torch.equal(got, twin)
        assert torch.equal(got, hf[0].transpose(0, 1))


@pytest.mark.parametrize("inter", [100, 37])
def test_silu_and_mul(device, inter):
    torch.manual_seed(inter)
    x = torch.randn(5, 2 * inter + 3, device=device)[:, 1:2 * inter + 1]
    torch.testing.assert_close(silu_and_mul(x), ref.silu_and_mul(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 64), (8, 3, 80)])
def test_store_kv_skips_padded_slots(device, block_size, num_kv_heads, head_dim):
    torch.manual_seed(block_size)
    num_blocks, t = 6, 11
    kv = torch.randn(t, 2 * num_kv_heads * head_dim, device=device)
    k, v = (part.view(t, num_kv_heads, head_dim) for part in kv.chunk(2, dim=-1))   # strided views
    slots = torch.randperm(num_blocks * block_size, device=device)[:t]
    slots[[2, 7, 10]] = -1
    k_cache, v_cache = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device) for _ in "kv")
    caches = [k_cache, v_cache, k_cache.clone(), v_cache.clone()]   # unwritten slots must keep their values
    store_kv(k, v, caches[0], caches[1], slots)
    ref.store_kv(k, v, caches[2], caches[3], slots)
    torch.testing.assert_close(caches[0], caches[2], rtol=0, atol=0)
    torch.testing.assert_close(caches[1], caches[3], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_elementwise_gpu_llama8b_shapes(dtype):
    torch.manual_seed(0)
    dev, t, hidden, inter, heads, kv_heads, d = "cuda", 64, 4096, 14336, 32, 8, 128
    rtol, atol = TOL[dtype]
    x, residual = torch.randn(t, hidden, device=dev, dtype=dtype), torch.randn(t, hidden, device=dev, dtype=dtype)
    weight = torch.randn(hidden, device=dev, dtype=dtype)
    out, res = rms_norm(x, weight, 1e-5, residual)
    want, want_res = ref.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)
    torch.testing.assert_close(res, want_res, rtol=0, atol=0)

    q = torch.randn(t, heads, d, device=dev, dtype=dtype)
    k = torch.randn(t, kv_heads, d, device=dev, dtype=dtype)
    positions = torch.randint(0, 4096, (t,), device=dev)
    cos_sin = _cos_sin(4096, d, dev)
    for got, want in zip(rotary_embedding(q, k, positions, cos_sin), ref.rotary_embedding(q, k, positions, cos_sin)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=2 * atol)

    gate_up = torch.randn(t, 2 * inter, device=dev, dtype=dtype)
    torch.testing.assert_close(silu_and_mul(gate_up), ref.silu_and_mul(gate_up), rtol=rtol, atol=atol)

    caches = [torch.zeros(300, 16, kv_heads, d, device=dev, dtype=dtype) for _ in range(4)]
    slots = torch.randperm(300 * 16, device=dev)[:t]
    slots[::5] = -1
    store_kv(k, q[:, :kv_heads], caches[0], caches[1], slots)
    ref.store_kv(k, q[:, :kv_heads], caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
