"""Residual add + RMSNorm in one launch (Triton): one program per token row, statistics in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hexgen.engine.kernels._common import check_dtype


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, normed_ptr, new_residual_ptr,
    stride_x, stride_r, stride_n, stride_nr, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    valid = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=valid, other=0.0)
        # rounded to the input dtype, as torch's `x + residual` is, before the statistics read it
        r = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + row * stride_nr + cols, r, mask=valid)
    else:
        r = x
    r32 = r.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(r32 * r32, axis=0) / hidden + eps)
    normed = (r32 * inv_rms).to(x.dtype)  # rounded before the weight multiplies it, as in HF's LlamaRMSNorm
    weight = tl.load(weight_ptr + cols, mask=valid, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(normed_ptr + row * stride_n + cols, out.to(normed_ptr.dtype.element_ty), mask=valid)


def add_rms_norm(
    x: torch.Tensor,  # [T, H]
    residual: torch.Tensor | None,  # [T, H], or None for the first layer
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual); without a residual the second is x itself."""
    num_tokens, hidden = x.shape
    check_dtype("x", x)
    if weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        raise TypeError(f"x, residual and weight must share one dtype, got {x.dtype}, "
                        f"{None if residual is None else residual.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(0) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("the hidden dimension of x, residual and weight must be contiguous")
    normed = torch.empty_like(x, memory_format=torch.contiguous_format)
    new_residual = x if residual is None else torch.empty_like(normed)
    if num_tokens == 0:
        return normed, new_residual
    block_h = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(num_tokens,)](
        x, x if residual is None else residual, weight, normed, new_residual,
        x.stride(0), x.stride(0) if residual is None else residual.stride(0), normed.stride(0),
        new_residual.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_H=block_h, num_warps=min(16, max(1, block_h // 256)),
    )
    return normed, new_residual
