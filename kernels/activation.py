"""SiLU-and-mul over the fused gate/up projection: [T, 2I] -> silu(gate) * up, tiled over I."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import autotune
from kernels.autotune import Config, TuneJob, TuneKey

CANDIDATES: tuple[Config, ...] = tuple({"BLOCK": b, "num_warps": w}
                                       for b, w in ((1024, 4), (512, 4), (2048, 8), (4096, 8), (256, 2)))


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,     # [T, 2I] rows at stride_x, unit stride within a row
    out_ptr,   # [T, I] contiguous
    stride_x, inter,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * inter + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _key(inter: int, dtype: torch.dtype) -> TuneKey:
    return TuneKey("silu_and_mul", f"i{triton.next_power_of_2(inter)}", str(dtype).removeprefix("torch."))


def _launch(x: torch.Tensor, out: torch.Tensor, config: Config) -> None:
    t, inter = out.shape
    block = min(config["BLOCK"], triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](x, out, x.stride(0), inter, BLOCK=block,
                                                         num_warps=config["num_warps"])


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.reference.silu_and_mul."""
    t, two_inter = x.shape
    assert two_inter % 2 == 0
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((t, two_inter // 2), dtype=x.dtype, device=x.device)
    if t:
        _launch(x, out, autotune.chosen(_key(two_inter // 2, x.dtype), CANDIDATES[0]))
    return out


def tune_jobs(num_tokens: int, inter: int, dtype: torch.dtype, device: torch.device) -> list[TuneJob]:
    inputs = autotune.lazy(lambda: (torch.randn(num_tokens, 2 * inter, dtype=dtype, device=device),
                                    torch.empty(num_tokens, inter, dtype=dtype, device=device)))
    return [TuneJob(_key(inter, dtype), CANDIDATES, lambda c: _launch(*inputs(), c))]
