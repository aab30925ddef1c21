"""Fused RMSNorm with an optional residual add: one program per row, one read and one write of each tensor."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import autotune
from kernels.autotune import Config, TuneJob, TuneKey

CANDIDATES: tuple[Config, ...] = tuple({"num_warps": w} for w in (4, 1, 2, 8, 16))


@triton.jit
def _rms_norm_kernel(
    x_ptr,          # [T, H] rows at stride_x
    residual_ptr,   # [T, H] rows at stride_r (read when HAS_RESIDUAL)
    weight_ptr,     # [H]
    out_ptr,        # [T, H] contiguous, the result dtype
    new_res_ptr,    # [T, H] contiguous, x's dtype (written when HAS_RESIDUAL)
    stride_x, stride_r, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # NOTE: the sum is rounded to x's dtype before normalising, as the twin (and HF) do
        x = (x + r).to(x.dtype)
        tl.store(new_res_ptr + row * hidden + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
    normed = (h * inv_rms).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * hidden + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def _key(hidden: int, dtype: torch.dtype) -> TuneKey:
    return TuneKey("rms_norm", f"h{triton.next_power_of_2(hidden)}", str(dtype).removeprefix("torch."))


def _default(hidden: int) -> Config:
    return {"num_warps": max(1, min(16, triton.next_power_of_2(hidden) // 256))}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as kernels.reference.rms_norm: returns (normed, x + residual or None)."""
    t, hidden = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    out = torch.empty((t, hidden), dtype=torch.result_type(weight, x), device=x.device)
    new_residual = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if t == 0:
        return out, new_residual
    config = autotune.chosen(_key(hidden, x.dtype), _default(hidden))
    _rms_norm_kernel[(t,)](
        x, residual if residual is not None else x, weight, out,
        new_residual if new_residual is not None else out,
        x.stride(0), residual.stride(0) if residual is not None else 0, hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_H=triton.next_power_of_2(hidden),
        num_warps=config["num_warps"])
    return out, new_residual


def tune_jobs(num_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> list[TuneJob]:
    def make():   # built only if the job is timed (autotune.lazy)
        x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
        return x, torch.randn_like(x), torch.ones(hidden, dtype=dtype, device=device), torch.empty_like(x), \
            torch.empty_like(x)
    inputs = autotune.lazy(make)

    def launch(config: Config) -> None:
        x, residual, weight, out, new_res = inputs()
        _rms_norm_kernel[(num_tokens,)](x, residual, weight, out, new_res, hidden, hidden, hidden, 1e-6,
                                        HAS_RESIDUAL=True, BLOCK_H=triton.next_power_of_2(hidden),
                                        num_warps=config["num_warps"])
    return [TuneJob(_key(hidden, dtype), (_default(hidden), *CANDIDATES), launch)]
